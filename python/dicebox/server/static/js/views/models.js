// Models: the list of trained models, and a model's page with its test metrics, confusion
// matrix as a heat map, training curves, genome and file downloads.

import {api, download} from "../api.js";
import {heatmap} from "../charts.js";
import {bytes, card, duration, errorBox, facts, h, link, notice, percent, replace, shortId, table,
  when} from "../dom.js";
import {curves, genomeSummary, genomeView, metricTiles} from "./common.js";

export async function modelsView(main, {query, signal, navigate}) {
  const dataset = query.get("dataset") || "";
  const [{items: datasets}, {items: models}] = await Promise.all([
    api("/v1/datasets", {query: {limit: 1000}, signal}),
    api("/v1/models", {query: {limit: 200, dataset}, signal}),
  ]);
  const filter = h("select", {id: "model-dataset"}, h("option", {value: ""}, "all datasets"),
    datasets.map((d) => h("option", {value: d.name, selected: d.name === dataset}, d.name)));
  filter.addEventListener("change", () => navigate(filter.value ? `/models?dataset=${encodeURIComponent(filter.value)}` : "/models"));
  const rows = models.map((m) => h("tr", {dataset: {model: m.id}},
    h("td", {}, link(`#/models/${m.id}`, shortId(m.id), {class: "mono"})),
    h("td", {}, link(`#/datasets/${encodeURIComponent(m.dataset)}`, m.dataset)),
    h("td", {class: "num"}, m.dataset_version.toLocaleString("en-US")),
    h("td", {class: "num"}, percent(m.metrics?.accuracy)),
    h("td", {class: "num"}, percent(m.fitness)),
    h("td", {class: "num"}, m.epochs),
    h("td", {}, genomeSummary(m.genome)),
    h("td", {class: "num"}, bytes(m.weights_bytes)),
    h("td", {}, when(m.created_at))));
  replace(main,
    h("div", {class: "page-head"}, h("h1", {}, "Models"),
      h("label", {class: "inline"}, h("span", {}, "Dataset"), filter)),
    card(null, models.length
      ? table(["Model", "Dataset", "Images", "Test accuracy", "Val. accuracy", "Epochs", "Network", "Weights", "Trained"],
        rows, {id: "models-table"})
      : notice("No models yet: they appear here when a train or evolve job succeeds.")));
}

export async function modelView(main, {params, signal}) {
  const [id] = params;
  const model = await api(`/v1/models/${encodeURIComponent(id)}`, {signal});
  const message = h("div", {id: "download-message"});

  async function save(file, filename) {
    replace(message);
    try {
      const size = await download(`/v1/models/${model.id}/${file}`, filename);
      replace(message, h("p", {class: "ok"}, `Downloaded ${filename} (${bytes(size)}).`));
    } catch (error) {
      replace(message, errorBox(error));
    }
  }

  const [channels, height, width] = model.input_shape;
  const metrics = model.metrics;
  replace(main,
    h("div", {class: "page-head"},
      h("div", {}, h("p", {class: "crumbs"}, link("#/models", "Models"), " / "),
        h("h1", {}, "Model ", h("span", {class: "mono"}, shortId(model.id)))),
      h("div", {class: "head-actions"},
        h("button", {type: "button", class: "button", id: "download-weights",
          onclick: () => save("weights", `${model.id}.safetensors`)}, "Download weights"),
        h("button", {type: "button", class: "button secondary", id: "download-json",
          onclick: () => save("model.json", `${model.id}.model.json`)}, "model.json"),
        link(`#/classify?model=${model.id}`, "Classify with it", {class: "button secondary"}))),
    message,
    card(null, facts([
      ["Id", h("span", {class: "mono"}, model.id)],
      ["Dataset", h("span", {}, link(`#/datasets/${encodeURIComponent(model.dataset)}`, model.dataset),
        ` (first ${model.dataset_version.toLocaleString("en-US")} images)`)],
      ["Input", `${width} × ${height} px, ${channels === 1 ? "grey" : "RGB"}`],
      ["Categories", String(model.categories.length)],
      ["Validation accuracy", percent(model.fitness)],
      ["Epochs", String(model.epochs)],
      ["Training time", duration(model.training_seconds)],
      ["Weights", `${bytes(model.weights_bytes)}, sha256 ${model.weights_sha256.slice(0, 12)}…`],
      ["Trained by", model.job_id ? link(`#/jobs/${model.job_id}`, `job ${shortId(model.job_id)}`) : "—"],
      ["Created", when(model.created_at)],
    ])),
    card("Test metrics", metricTiles(metrics)),
    h("div", {class: "columns"},
      card("Confusion matrix", metrics?.confusion
        ? h("div", {}, h("p", {class: "muted"}, "Rows: the true category; columns: the predicted one. "
          + "The shade is the share of the row, so the diagonal shows each category's recall."),
        h("div", {class: "scroll-x", id: "confusion"}, heatmap(metrics.confusion, model.categories)))
        : notice("This model has no evaluation.")),
      card("Genome", genomeView(model.genome))),
    card("Training curves", curves(model.history || [], {empty: "No history recorded"})));
}
