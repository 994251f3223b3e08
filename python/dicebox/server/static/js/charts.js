// Charts drawn by hand as inline SVG: line charts (training curves, fitness by generation),
// a heat map (confusion matrix), horizontal bars (images per category) and the lineage of an
// evolved network. Colours are presentation attributes, so no inline style is needed.

import {percent, svg} from "./dom.js";

export const COLORS = ["#2f6fde", "#e07b39", "#2e9d6a", "#8a5cc7", "#c2455b", "#5f7385"];

/** Round tick values covering [min, max], about `count` of them. */
export function niceTicks(min, max, count = 5) {
  if (!(max > min)) return [min];
  const raw = (max - min) / count;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw) ?? 10 * power;
  const ticks = [];
  for (let value = Math.ceil(min / step - 1e-9) * step; value <= max + step * 1e-9; value += step) {
    ticks.push(Math.abs(value) < step * 1e-9 ? 0 : value);
  }
  return ticks;
}

function label(value) {
  if (Number.isInteger(value)) return String(value);
  const text = value.toPrecision(3);
  return String(Number(text));
}

/**
 * A line chart. series: [{name, points: [[x, y], ...], color?, dashed?, line? (default true),
 * dots? (default: when few points)}]. options: xLabel, yLabel, yDomain ([min, max] fixed),
 * yFormat (tick label), xInteger (whole-number x ticks), empty (text while no points),
 * width, height.
 */
export function lineChart(series, options = {}) {
  const width = options.width ?? 560;
  const height = options.height ?? 260;
  const margin = {top: 30, right: 18, bottom: 42, left: 56};
  const plotW = width - margin.left - margin.right;
  const plotH = height - margin.top - margin.bottom;
  const root = svg("svg", {class: "chart line-chart", viewBox: `0 0 ${width} ${height}`,
    role: "img", "aria-label": options.title ?? options.yLabel ?? "chart"});
  const all = series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));

  let [xMin, xMax] = all.length ? [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))] : [0, 1];
  if (options.xMin !== undefined) xMin = Math.min(xMin, options.xMin);
  if (xMax - xMin < 1) xMax = xMin + 1;
  let [yMin, yMax] = options.yDomain ?? (all.length
    ? [Math.min(0, ...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))] : [0, 1]);
  if (!(yMax > yMin)) yMax = yMin + 1;
  const yTicks = niceTicks(yMin, yMax, 5);
  if (!options.yDomain) {
    yMin = Math.min(yMin, yTicks[0]);
    yMax = Math.max(yMax, yTicks[yTicks.length - 1]);
  }
  let xTicks = niceTicks(xMin, xMax, Math.min(8, Math.max(2, Math.round(plotW / 70))));
  if (options.xInteger) xTicks = [...new Set(xTicks.map(Math.round))].filter((v) => v >= xMin && v <= xMax);

  const sx = (x) => margin.left + ((x - xMin) / (xMax - xMin)) * plotW;
  const sy = (y) => margin.top + plotH - ((y - yMin) / (yMax - yMin)) * plotH;
  const yFormat = options.yFormat ?? label;

  const grid = svg("g", {class: "grid"});
  for (const tick of yTicks) {
    if (tick < yMin - 1e-9 || tick > yMax + 1e-9) continue;
    grid.append(
      svg("line", {x1: margin.left, x2: margin.left + plotW, y1: sy(tick), y2: sy(tick)}),
      svg("text", {class: "tick", x: margin.left - 8, y: sy(tick) + 4, "text-anchor": "end"}, yFormat(tick)));
  }
  for (const tick of xTicks) {
    grid.append(svg("text", {class: "tick", x: sx(tick), y: margin.top + plotH + 16, "text-anchor": "middle"}, label(tick)));
  }
  root.append(grid, svg("line", {class: "axis", x1: margin.left, x2: margin.left + plotW,
    y1: margin.top + plotH, y2: margin.top + plotH}));
  if (options.xLabel) {
    root.append(svg("text", {class: "axis-label", x: margin.left + plotW / 2, y: height - 6,
      "text-anchor": "middle"}, options.xLabel));
  }
  if (options.yLabel) {
    root.append(svg("text", {class: "axis-label", x: 0, y: 0, "text-anchor": "middle",
      transform: `translate(14 ${margin.top + plotH / 2}) rotate(-90)`}, options.yLabel));
  }

  const legend = svg("g", {class: "legend"});
  let legendX = margin.left;
  series.forEach((s, index) => {
    const color = s.color ?? COLORS[index % COLORS.length];
    const finite = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    const group = svg("g", {class: "series", "data-series": s.name, "data-points": finite.length});
    if (s.line !== false && finite.length > 1) {
      const d = finite.map(([x, y], i) => `${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
      group.append(svg("path", {d, fill: "none", stroke: color, "stroke-width": 2,
        "stroke-dasharray": s.dashed ? "6 4" : null, "stroke-linejoin": "round"}));
    }
    if (s.dots ?? finite.length <= 40) {
      for (const [x, y] of finite) {
        group.append(svg("circle", {cx: sx(x), cy: sy(y), r: s.line === false ? 3.5 : 2.5, fill: color,
          "fill-opacity": s.line === false ? 0.55 : 1},
        svg("title", {}, `${s.name}: ${yFormat(y)} at ${options.xLabel ?? "x"} ${label(x)}`)));
      }
    }
    root.append(group);
    legend.append(
      svg("rect", {x: legendX, y: 9, width: 14, height: 4, rx: 2, fill: color}),
      svg("text", {class: "legend-text", x: legendX + 19, y: 15}, s.name));
    legendX += 30 + s.name.length * 7;
  });
  root.append(legend);
  if (!all.length) {
    root.append(svg("text", {class: "empty", x: margin.left + plotW / 2, y: margin.top + plotH / 2,
      "text-anchor": "middle"}, options.empty ?? "No data yet"));
  }
  return root;
}

function mix(from, to, t) {
  const a = from.match(/\w\w/g).map((x) => parseInt(x, 16));
  const b = to.match(/\w\w/g).map((x) => parseInt(x, 16));
  return `#${a.map((v, i) => Math.round(v + (b[i] - v) * t).toString(16).padStart(2, "0")).join("")}`;
}

/**
 * A confusion matrix as a heat map: rows the true category, columns the predicted one, each
 * cell shaded by its share of the row (so every category's recall reads the same way), with
 * its count written in when the cells are large enough.
 */
export function heatmap(matrix, labels) {
  const n = labels.length;
  const cell = Math.max(12, Math.min(44, Math.floor(440 / Math.max(1, n))));
  const longest = Math.max(...labels.map((l) => String(l).length), 1);
  const labelW = Math.min(140, 14 + longest * 7);
  const top = 44;
  const width = labelW + n * cell + 30;
  const height = top + n * cell + 12;
  const root = svg("svg", {class: "chart heatmap", viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": "confusion matrix", "data-categories": n});
  root.append(
    svg("text", {class: "axis-label", x: labelW + (n * cell) / 2, y: 12, "text-anchor": "middle"}, "Predicted"),
    svg("text", {class: "axis-label", x: 0, y: 0, "text-anchor": "middle",
      transform: `translate(${width - 8} ${top + (n * cell) / 2}) rotate(90)`}, "True"));
  const showLabels = cell >= 16;
  labels.forEach((name, j) => {
    if (!showLabels) return;
    root.append(svg("text", {class: "tick", x: labelW + j * cell + cell / 2, y: top - 8, "text-anchor": "middle"},
      String(name).slice(0, Math.max(2, Math.floor(cell / 6)))));
  });
  matrix.forEach((row, i) => {
    const total = row.reduce((a, b) => a + b, 0);
    if (showLabels) {
      root.append(svg("text", {class: "tick", x: labelW - 8, y: top + i * cell + cell / 2 + 4, "text-anchor": "end"},
        String(labels[i]).slice(0, 20)));
    }
    row.forEach((count, j) => {
      const share = total ? count / total : 0;
      const x = labelW + j * cell;
      const y = top + i * cell;
      root.append(svg("rect", {class: i === j ? "cell diagonal" : "cell", x, y, width: cell - 1, height: cell - 1,
        fill: mix("f3f6fa", "1d4e9e", share), "data-count": count},
      svg("title", {}, `true ${labels[i]}, predicted ${labels[j]}: ${count} (${percent(share)} of ${labels[i]})`)));
      if (cell >= 22 && count) {
        root.append(svg("text", {class: share > 0.5 ? "cell-text light" : "cell-text", x: x + cell / 2,
          y: y + cell / 2 + 4, "text-anchor": "middle"}, String(count)));
      }
    });
  });
  return root;
}

/** Horizontal bars: items [{label, value}], the value written beside each bar. */
export function barChart(items, {valueFormat = String} = {}) {
  const rowH = 24;
  const longest = Math.max(...items.map((i) => String(i.label).length), 1);
  const labelW = Math.min(160, 16 + longest * 7);
  const width = 560;
  const barW = width - labelW - 70;
  const height = Math.max(rowH, items.length * rowH) + 4;
  const max = Math.max(1, ...items.map((i) => i.value));
  const root = svg("svg", {class: "chart bar-chart", viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": "bar chart"});
  items.forEach((item, index) => {
    const y = index * rowH + 2;
    const w = Math.max(item.value ? 2 : 0, (item.value / max) * barW);
    root.append(
      svg("text", {class: "tick", x: labelW - 8, y: y + 15, "text-anchor": "end"}, String(item.label).slice(0, 22)),
      svg("rect", {class: "bar", x: labelW, y: y + 3, width: w, height: rowH - 8, rx: 3, fill: COLORS[0]},
        svg("title", {}, `${item.label}: ${valueFormat(item.value)}`)),
      svg("text", {class: "value", x: labelW + w + 6, y: y + 15}, valueFormat(item.value)));
  });
  return root;
}

/**
 * The ancestry of one individual of an evolution: individuals [{id, generation, parents,
 * fitness}] (any order); draws `bestId` and all its ancestors, one column per generation,
 * with an edge from each parent to its child.
 */
export function lineage(individuals, bestId) {
  const byId = new Map(individuals.map((i) => [i.id, i]));
  const keep = new Set();
  const stack = [bestId];
  while (stack.length) {
    const id = stack.pop();
    if (keep.has(id) || !byId.has(id)) continue;
    keep.add(id);
    stack.push(...(byId.get(id).parents || []));
  }
  const nodes = [...keep].map((id) => byId.get(id));
  const generations = [...new Set(nodes.map((n) => n.generation))].sort((a, b) => a - b);
  const columns = generations.map((g) => nodes.filter((n) => n.generation === g).sort((a, b) => a.id - b.id));
  const nodeW = 104;
  const nodeH = 42;
  const colGap = 56;
  const rowGap = 14;
  const rows = Math.max(1, ...columns.map((c) => c.length));
  const width = Math.max(1, columns.length) * (nodeW + colGap) - colGap + 8;
  const height = 24 + rows * (nodeH + rowGap);
  // Drawn at its natural size (width and height), scrolled sideways when wider than the page.
  const root = svg("svg", {class: "chart lineage", viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
    "aria-label": "lineage of the best network", "data-nodes": nodes.length});
  const place = new Map();
  columns.forEach((column, c) => {
    const x = 4 + c * (nodeW + colGap);
    root.append(svg("text", {class: "tick", x: x + nodeW / 2, y: 12, "text-anchor": "middle"},
      `generation ${generations[c]}`));
    const offset = ((rows - column.length) * (nodeH + rowGap)) / 2;
    column.forEach((node, r) => place.set(node.id, {x, y: 22 + offset + r * (nodeH + rowGap)}));
  });
  const edges = svg("g", {class: "edges"});
  for (const node of nodes) {
    const to = place.get(node.id);
    for (const parent of node.parents || []) {
      const from = place.get(parent);
      if (!from) continue;
      const x1 = from.x + nodeW;
      const y1 = from.y + nodeH / 2;
      const x2 = to.x;
      const y2 = to.y + nodeH / 2;
      const mid = (x1 + x2) / 2;
      edges.append(svg("path", {d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`, fill: "none"}));
    }
  }
  root.append(edges);
  for (const node of nodes) {
    const {x, y} = place.get(node.id);
    const best = node.id === bestId;
    root.append(svg("g", {class: best ? "node best" : "node", "data-id": node.id},
      svg("rect", {x, y, width: nodeW, height: nodeH, rx: 6}),
      svg("text", {class: "node-title", x: x + 10, y: y + 17}, `#${node.id}${node.cached ? " (copy)" : ""}`),
      svg("text", {class: "node-text", x: x + 10, y: y + 33}, `fitness ${percent(node.fitness)}`),
      svg("title", {}, `individual ${node.id}, generation ${node.generation}, parents ${
        (node.parents || []).length ? node.parents.join(", ") : "none"}`)));
  }
  return root;
}
