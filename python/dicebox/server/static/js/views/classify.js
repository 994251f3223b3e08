// Classify: choose a model (a dataset's best, or one model), drop images on the page and see
// each image's most probable categories.

import {api} from "../api.js";
import {card, errorBox, h, imageCanvas, link, notice, percent, replace, shortId} from "../dom.js";
import {dropZone} from "../dropzone.js";

const TOP = 5;
// Images per request (the server refuses more than DICEBOX_MAX_IMAGES_PER_REQUEST).
const BATCH = 50;

export async function classifyView(main, {query, signal}) {
  const [{items: datasets}, {items: models}] = await Promise.all([
    api("/v1/datasets", {query: {limit: 1000}, signal}),
    api("/v1/models", {query: {limit: 100}, signal}),
  ]);
  const wantedModel = query.get("model");
  const wantedDataset = query.get("dataset");
  const withModels = new Set(models.map((m) => m.dataset));
  const choices = [
    ...datasets.filter((d) => withModels.has(d.name)).map((d) => ({value: `best:${d.name}`,
      text: `Best model of ${d.name}`, selected: d.name === wantedDataset && !wantedModel})),
    ...models.map((m) => ({value: `model:${m.id}`, selected: m.id === wantedModel,
      text: `Model ${shortId(m.id)} (${m.dataset}, test accuracy ${percent(m.metrics?.accuracy)})`})),
  ];
  if (wantedModel && !models.some((m) => m.id === wantedModel)) {
    choices.unshift({value: `model:${wantedModel}`, text: `Model ${shortId(wantedModel)}`, selected: true});
  }
  if (!choices.length) {
    replace(main, h("div", {class: "page-head"}, h("h1", {}, "Classify")),
      card(null, notice("No trained model yet: train one first."), link("#/jobs", "Submit a job")));
    return;
  }
  const select = h("select", {id: "classify-model"},
    choices.map((c) => h("option", {value: c.value, selected: c.selected}, c.text)));
  const results = h("div", {class: "predictions", id: "predictions"});
  const status = h("div", {id: "classify-status", role: "status"});

  async function classify(files) {
    replace(status, h("p", {class: "muted"}, `Classifying ${files.length} image${files.length === 1 ? "" : "s"}…`));
    const [kind, ref] = splitChoice(select.value);
    const path = `/v1/models/${kind === "best" ? "best" : encodeURIComponent(ref)}/classify`;
    const items = await Promise.all(files.map(async (file) => ({file, canvas: await imageCanvas(file, "preview")})));
    try {
      for (let start = 0; start < items.length; start += BATCH) {
        const batch = items.slice(start, start + BATCH);
        const form = new FormData();
        for (const {file} of batch) form.append("files", file, file.name);
        const answer = await api(path, {method: "POST", body: form,
          query: {top: TOP, dataset: kind === "best" ? ref : null}});
        batch.forEach((item, index) => results.prepend(prediction(item, answer.predictions[index], answer.model_id)));
      }
      replace(status);
    } catch (error) {
      replace(status, errorBox(error));
    }
  }

  replace(main,
    h("div", {class: "page-head"}, h("h1", {}, "Classify")),
    card(null,
      h("label", {class: "field"}, h("span", {}, "Model"), select),
      dropZone({id: "classify-zone", label: "Drop PNG or JPEG images to classify",
        hint: "or click to choose files", onFiles: classify}),
      status),
    results);
}

function splitChoice(value) {
  const colon = value.indexOf(":");
  return [value.slice(0, colon), value.slice(colon + 1)];
}

function prediction({file, canvas}, answer, modelId) {
  const bars = answer.top.map((entry, rank) => h("li", {class: rank === 0 ? "top" : ""},
    h("span", {class: "label"}, entry.category),
    probabilityBar(entry.probability),
    h("span", {class: "value"}, percent(entry.probability))));
  return h("article", {class: "card prediction", dataset: {category: answer.category}},
    h("div", {class: "prediction-image"}, canvas ?? h("div", {class: "thumb placeholder"})),
    h("div", {class: "prediction-body"},
      h("h3", {}, answer.category, h("span", {class: "muted"}, ` ${percent(answer.probability)}`)),
      h("p", {class: "muted small"}, `${file.name} · model `, link(`#/models/${modelId}`, shortId(modelId), {class: "mono"})),
      h("ol", {class: "top-list"}, bars)));
}

function probabilityBar(probability) {
  const fill = h("span", {class: "fill"});
  // A CSSOM property, not a style attribute: allowed by the page's Content-Security-Policy.
  fill.style.width = `${Math.max(0, Math.min(1, probability)) * 100}%`;
  return h("span", {class: "bar-track"}, fill);
}
