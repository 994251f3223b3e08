// Datasets: the list with a form to create one, and a dataset's page with its images per
// category, a grid of sample images and an upload by drag and drop.

import {api} from "../api.js";
import {barChart} from "../charts.js";
import {card, errorBox, facts, h, imageCanvas, inBatches, link, notice, replace, table, when} from "../dom.js";
import {dropZone} from "../dropzone.js";

const SAMPLES = 32;
// Files per upload request (the server's DICEBOX_MAX_IMAGES_PER_REQUEST is 1000 by default);
// smaller requests also let the progress line move.
const UPLOAD_BATCH = 50;

export async function datasetsView(main, {signal, navigate}) {
  const {items} = await api("/v1/datasets", {query: {limit: 1000}, signal});
  const rows = items.map((d) => h("tr", {},
    h("td", {}, link(`#/datasets/${encodeURIComponent(d.name)}`, d.name)),
    h("td", {}, `${d.width} × ${d.height}`),
    h("td", {}, d.channels === 1 ? "grey" : "RGB"),
    h("td", {class: "num"}, d.count.toLocaleString("en-US")),
    h("td", {class: "num"}, d.categories.length),
    h("td", {}, when(d.updated_at))));

  const message = h("div");
  const form = h("form", {class: "form-grid", id: "create-dataset"},
    field("Name", h("input", {name: "name", required: true, maxlength: "64",
      placeholder: "dice", title: "1-64 letters, digits, '.', '_' or '-'"})),
    field("Width", h("input", {name: "width", type: "number", min: "1", value: "32", required: true})),
    field("Height", h("input", {name: "height", type: "number", min: "1", value: "32", required: true})),
    field("Channels", h("select", {name: "channels"},
      h("option", {value: "1"}, "1 (grey)"), h("option", {value: "3"}, "3 (RGB)"))),
    h("div", {class: "actions"}, h("button", {type: "submit", class: "button"}, "Create dataset")));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData(form);
    replace(message);
    try {
      const created = await api("/v1/datasets", {method: "POST", json: {
        name: data.get("name").trim(), width: Number(data.get("width")),
        height: Number(data.get("height")), channels: Number(data.get("channels"))}});
      navigate(`/datasets/${encodeURIComponent(created.name)}`);
    } catch (error) {
      replace(message, errorBox(error));
    }
  });

  replace(main,
    h("div", {class: "page-head"}, h("h1", {}, "Datasets")),
    card("All datasets", items.length
      ? table(["Name", "Size", "Channels", "Images", "Categories", "Updated"], rows, {id: "datasets-table"})
      : notice("No datasets yet: create one below, then drop images on it.")),
    card("New dataset", h("p", {class: "muted"},
      "Images of any size are converted to the dataset's size and channels as they arrive."), form, message));
}

// Bars stay readable up to this many categories; the rest are summed up in a line.
const MAX_BARS = 60;

function categoryBars(dataset) {
  const categories = dataset.categories;
  if (!categories.length) return notice("No categories yet.");
  const rest = categories.slice(MAX_BARS);
  return h("div", {},
    barChart(categories.slice(0, MAX_BARS).map((c) => ({label: c.name, value: c.count}))),
    rest.length ? notice(`…and ${rest.length} more categories with ${
      rest.reduce((sum, c) => sum + c.count, 0).toLocaleString("en-US")} images.`) : null);
}

function field(label, control) {
  return h("label", {class: "field"}, h("span", {}, label), control);
}

export async function datasetView(main, {params, signal}) {
  const [name] = params;
  const path = `/v1/datasets/${encodeURIComponent(name)}`;
  const dataset = await api(path, {signal});

  const summary = facts([
    ["Images", dataset.count.toLocaleString("en-US")],
    ["Image size", `${dataset.width} × ${dataset.height} px`],
    ["Channels", dataset.channels === 1 ? "1 (grey)" : "3 (RGB)"],
    ["Categories", String(dataset.categories.length)],
    ["Created", when(dataset.created_at)],
    ["Updated", when(dataset.updated_at)],
  ]);
  const counts = categoryBars(dataset);
  const grid = h("div", {class: "sample-grid", id: "samples"});
  const status = h("p", {class: "muted", id: "upload-status", role: "status"});
  const category = h("input", {name: "category", id: "upload-category", required: true, list: "known-categories",
    placeholder: "e.g. 6"});
  const known = h("datalist", {id: "known-categories"}, dataset.categories.map((c) => h("option", {value: c.name})));
  const zone = dropZone({id: "upload-zone", label: "Drop PNG or JPEG images here",
    hint: "or click to choose files; all of them are added to the category above",
    onFiles: (files) => upload(files)});

  async function upload(files) {
    const label = category.value.trim();
    if (!label) {
      replace(status, errorBox("Enter the category of these images first."));
      category.focus();
      return;
    }
    zone.classList.add("busy");
    let added = 0;
    try {
      for (let start = 0; start < files.length; start += UPLOAD_BATCH) {
        replace(status, `Uploading ${start + 1}–${Math.min(files.length, start + UPLOAD_BATCH)} of ${files.length}…`);
        const form = new FormData();
        form.append("category", label);
        for (const file of files.slice(start, start + UPLOAD_BATCH)) form.append("files", file, file.name);
        const result = await api(`${path}/images`, {method: "POST", body: form});
        added += result.added;
      }
      replace(status, h("span", {class: "ok"}, `Added ${added} image${added === 1 ? "" : "s"} to “${label}”.`));
      await refresh();
    } catch (error) {
      const note = added ? ` (${added} added before this request)` : "";
      replace(status, errorBox(`${error.message}${note}`));
    } finally {
      zone.classList.remove("busy");
    }
  }

  const countsCard = card("Images per category", counts);
  const summaryCard = card(null, summary);
  async function refresh() {
    const fresh = await api(path, {signal});
    replace(summaryCard, facts([
      ["Images", fresh.count.toLocaleString("en-US")],
      ["Image size", `${fresh.width} × ${fresh.height} px`],
      ["Channels", fresh.channels === 1 ? "1 (grey)" : "3 (RGB)"],
      ["Categories", String(fresh.categories.length)],
      ["Created", when(fresh.created_at)],
      ["Updated", when(fresh.updated_at)],
    ]));
    replace(countsCard, h("h2", {}, "Images per category"), categoryBars(fresh));
    replace(known, fresh.categories.map((c) => h("option", {value: c.name})));
    await loadSamples(fresh.count);
  }

  async function loadSamples(count) {
    if (!count) {
      replace(grid, notice("No images yet."));
      return;
    }
    // Evenly spread over the dataset, which is stored in upload order, so every category
    // uploaded shows up.
    const shown = Math.min(SAMPLES, count);
    const indices = [...new Set(Array.from({length: shown}, (_, i) => Math.floor((i * count) / shown)))];
    const tiles = indices.map((index) => h("figure", {class: "sample"}, h("div", {class: "thumb placeholder"}),
      h("figcaption", {}, `#${index}`)));
    replace(grid, tiles);
    await inBatches(indices.map((index, i) => async () => {
      try {
        const response = await api(`${path}/images/${index}`, {raw: true, signal});
        const categoryName = decodeURIComponent(response.headers.get("X-Dicebox-Category") ?? "");
        const canvas = await imageCanvas(await response.blob());
        tiles[i].replaceChildren(canvas ?? h("div", {class: "thumb placeholder"}),
          h("figcaption", {title: `image ${index}`}, categoryName));
        tiles[i].dataset.category = categoryName;
      } catch (error) {
        if (signal.aborted) return;
        // One unreadable sample leaves a gap with the reason, not a broken page.
        tiles[i].replaceChildren(h("div", {class: "thumb placeholder", title: error.message}),
          h("figcaption", {}, "unavailable"));
      }
    }), 6);
  }

  replace(main,
    h("div", {class: "page-head"},
      h("div", {}, h("p", {class: "crumbs"}, link("#/datasets", "Datasets"), " / "), h("h1", {}, dataset.name)),
      h("div", {class: "head-actions"},
        link(`#/jobs?dataset=${encodeURIComponent(dataset.name)}`, "Train on this dataset", {class: "button"}),
        link(`#/classify?dataset=${encodeURIComponent(dataset.name)}`, "Classify", {class: "button secondary"}))),
    summaryCard,
    h("div", {class: "columns"},
      countsCard,
      card("Add images",
        h("label", {class: "field"}, h("span", {}, "Category"), category), known, zone, status)),
    card("Samples", h("p", {class: "muted"}, "Spread evenly over the dataset in the order stored."), grid));
  await loadSamples(dataset.count);
}
