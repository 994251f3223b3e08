// Pieces shown on more than one page: training curves, test metrics and a genome.

import {lineChart} from "../charts.js";
import {h, number, percent, table} from "../dom.js";

/** Loss and accuracy by epoch, training and validation, as two charts side by side. */
export function curves(history, {empty = "Waiting for the first epoch…"} = {}) {
  const points = (key) => history.filter((e) => e[key] !== undefined && e[key] !== null).map((e) => [e.epoch, e[key]]);
  const loss = lineChart([
    {name: "training loss", points: points("loss")},
    {name: "validation loss", points: points("val_loss"), dashed: true},
  ], {xLabel: "epoch", yLabel: "loss", xInteger: true, xMin: 1, empty, title: "loss by epoch"});
  const accuracy = lineChart([
    {name: "training accuracy", points: points("accuracy")},
    {name: "validation accuracy", points: points("val_accuracy"), dashed: true},
  ], {xLabel: "epoch", yLabel: "accuracy", xInteger: true, xMin: 1, yDomain: [0, 1],
    yFormat: (v) => percent(v, 0), empty, title: "accuracy by epoch"});
  loss.id = "loss-chart";
  accuracy.id = "accuracy-chart";
  return h("div", {class: "chart-pair"}, h("figure", {}, loss), h("figure", {}, accuracy));
}

const METRICS = [
  ["accuracy", "Accuracy", percent],
  ["top_k", "Top-k accuracy", percent],
  ["precision", "Precision (macro)", percent],
  ["recall", "Recall (macro)", percent],
  ["f1", "F1 (macro)", percent],
  ["loss", "Loss", (v) => number(v, 4)],
];

/** The evaluation's numbers as tiles. */
export function metricTiles(metrics) {
  if (!metrics) return h("p", {class: "muted"}, "No metrics.");
  return h("div", {class: "tiles", id: "metrics"}, METRICS.filter(([key]) => metrics[key] !== undefined).map(
    ([key, label, format]) => h("div", {class: "tile", dataset: {metric: key}},
      h("span", {class: "tile-label"}, key === "top_k" && metrics.k ? `Top-${metrics.k} accuracy` : label),
      h("span", {class: "tile-value"}, format(metrics[key])))),
  metrics.count !== undefined ? h("div", {class: "tile"}, h("span", {class: "tile-label"}, "Images evaluated"),
    h("span", {class: "tile-value"}, number(metrics.count))) : null);
}

function layerDetails(layer) {
  const skip = new Set(["type", "activation"]);
  return Object.entries(layer).filter(([key]) => !skip.has(key)).map(([key, value]) =>
    `${key} ${Array.isArray(value) ? value.join("×") : typeof value === "number" && !Number.isInteger(value)
      ? value.toPrecision(3) : value}`).join(", ");
}

/** A genome: its optimizer, a table of its layers and the JSON itself. */
export function genomeView(genome) {
  if (!genome) return h("p", {class: "muted"}, "No genome.");
  const optimizer = genome.optimizer || {};
  const rows = (genome.layers || []).map((layer, index) => h("tr", {},
    h("td", {class: "num"}, index + 1), h("td", {}, layer.type), h("td", {}, layer.activation ?? "—"),
    h("td", {}, layerDetails(layer))));
  return h("div", {class: "genome"},
    h("p", {}, "Optimizer ", h("strong", {}, optimizer.name ?? "—"),
      optimizer.learning_rate !== undefined ? `, learning rate ${optimizer.learning_rate.toPrecision(3)}` : "",
      ". The flatten before the first dense layer and the output layer (one unit per category) are implied."),
    rows.length ? table(["#", "Layer", "Activation", "Settings"], rows, {class: "layers"})
      : h("p", {class: "muted"}, "No hidden layers."),
    h("details", {}, h("summary", {}, "Genome JSON"), h("pre", {class: "code"}, JSON.stringify(genome, null, 2))));
}

/** "3 layers: conv2d 16, maxpool2d, dense 64" */
export function genomeSummary(genome) {
  const layers = genome?.layers || [];
  const parts = layers.map((l) => l.type + (l.filters ? ` ${l.filters}` : l.size ? ` ${l.size}` : ""));
  return `${layers.length} layer${layers.length === 1 ? "" : "s"}${parts.length ? ": " : ""}${parts.join(", ")}`;
}
