// A drop zone for image files: drag files onto it, or click it (or press Enter on it) to
// choose them. Either way onFiles(File[]) gets the PNG and JPEG files among them.

import {h} from "./dom.js";

const ACCEPTED = ["image/png", "image/jpeg"];

export function dropZone({id, label, hint, multiple = true, onFiles}) {
  const input = h("input", {type: "file", accept: ACCEPTED.join(","), multiple, class: "visually-hidden",
    id: id ? `${id}-input` : null, tabindex: "-1"});
  const zone = h("div", {class: "dropzone", id, tabindex: "0", role: "button", "aria-label": label},
    h("strong", {}, label), hint ? h("span", {class: "muted"}, hint) : null, input);

  function take(fileList) {
    const files = [...fileList].filter((file) => ACCEPTED.includes(file.type) || /\.(png|jpe?g)$/i.test(file.name));
    if (files.length) onFiles(files);
  }

  zone.addEventListener("click", (event) => {
    if (event.target !== input) input.click();
  });
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      input.click();
    }
  });
  input.addEventListener("change", () => {
    take(input.files);
    input.value = "";
  });
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  }
  zone.addEventListener("dragleave", (event) => {
    if (!zone.contains(event.relatedTarget)) zone.classList.remove("dragging");
  });
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    take(event.dataTransfer?.files ?? []);
  });
  return zone;
}
