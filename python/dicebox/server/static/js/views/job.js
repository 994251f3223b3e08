// A job's page: its status and progress, live over the job's event stream; for a train job
// the loss and accuracy curves by epoch, for an evolve job the fitness by generation, every
// individual and the lineage of the best; then the result (model, test metrics).

import {api, followEvents} from "../api.js";
import {lineChart, lineage} from "../charts.js";
import {between, card, duration, errorBox, facts, h, link, number, percent, progressBar, replace, shortId,
  statusBadge, table, when} from "../dom.js";
import {curves, genomeSummary, metricTiles} from "./common.js";

const FINISHED = new Set(["succeeded", "failed", "canceled"]);
const REDRAW_MS = 60;

export async function jobView(main, {params, signal}) {
  const [id] = params;
  let job = await api(`/v1/jobs/${encodeURIComponent(id)}`, {signal});
  const epochs = new Map((job.history || []).map((e) => [e.epoch, e]));
  const individuals = new Map();
  const generations = new Map();
  let live = "connecting";

  const badge = h("span", {id: "job-status"});
  const liveNote = h("span", {class: "live", id: "live"});
  const cancelButton = h("button", {type: "button", class: "button secondary", id: "cancel-job"}, "Cancel job");
  const actionError = h("div");
  const summary = h("section", {class: "card"});
  const progressArea = h("div", {class: "job-progress"});
  const body = h("div");
  const resultArea = h("div", {id: "result"});

  cancelButton.addEventListener("click", async () => {
    cancelButton.disabled = true;
    try {
      job = {...job, ...(await api(`/v1/jobs/${job.id}/cancel`, {method: "POST"}))};
      schedule();
    } catch (error) {
      replace(actionError, errorBox(error));
      cancelButton.disabled = false;
    }
  });

  function progress() {
    if (FINISHED.has(job.status)) return job.progress;
    if (job.kind === "train") {
      const planned = job.spec?.params?.epochs;
      return planned ? Math.min(1, epochs.size / planned) : job.progress;
    }
    const evolution = job.spec?.evolution;
    const planned = evolution ? evolution.population * evolution.generations : 0;
    return planned ? Math.min(1, individuals.size / planned) : job.progress;
  }

  function drawSummary() {
    replace(badge, statusBadge(job.status));
    replace(liveNote, live === "live" ? "● live" : live === "ended" ? "" : live === "reconnecting" ? "reconnecting…" : "connecting…");
    liveNote.dataset.state = live;
    cancelButton.hidden = FINISHED.has(job.status) || job.cancel_requested;
    const spec = job.spec || {};
    replace(summary, facts([
      ["Kind", job.kind],
      ["Dataset", job.dataset ? h("span", {}, link(`#/datasets/${encodeURIComponent(job.dataset)}`, job.dataset),
        spec.version !== undefined ? ` (first ${spec.version.toLocaleString("en-US")} images)` : "") : "—"],
      ["Submitted", when(job.created_at)],
      ["Started", when(job.started_at)],
      ["Finished", when(job.finished_at)],
      ["Ran for", job.started_at ? duration(between(job.started_at, job.finished_at)) : "—"],
      ["Attempts", `${job.attempts} of ${job.max_attempts}`],
      ["Priority", String(job.priority)],
      job.worker ? ["Worker", job.worker] : null,
      job.parent_id ? ["Part of", link(`#/jobs/${job.parent_id}`, `evolve job ${shortId(job.parent_id)}`)] : null,
      job.cancel_requested && !FINISHED.has(job.status) ? ["Cancel", "requested"] : null,
    ]), h("details", {class: "spec"}, h("summary", {}, "Submitted parameters"),
      h("pre", {class: "code"}, JSON.stringify(spec, null, 2))));
    const value = progress();
    replace(progressArea, progressBar(value), h("span", {class: "muted"}, percent(value, 0)),
      job.error ? errorBox(`Error: ${job.error}`) : null);
  }

  function drawTrain() {
    const history = [...epochs.values()].sort((a, b) => a.epoch - b.epoch);
    const rows = history.map((e) => h("tr", {},
      h("td", {class: "num"}, e.epoch), h("td", {class: "num"}, number(e.loss, 4)),
      h("td", {class: "num"}, number(e.val_loss, 4)), h("td", {class: "num"}, percent(e.accuracy)),
      h("td", {class: "num"}, percent(e.val_accuracy)),
      h("td", {class: "num"}, e.samples_per_second ? Math.round(e.samples_per_second).toLocaleString("en-US") : "—"),
      h("td", {class: "num"}, duration(e.seconds))));
    replace(body,
      card("Training curves", curves(history, {empty: FINISHED.has(job.status) ? "No epochs were recorded"
        : "Waiting for the first epoch…"})),
      history.length ? card("Epochs", table(["Epoch", "Loss", "Val. loss", "Accuracy", "Val. accuracy",
        "Images/s", "Time"], rows, {id: "epochs-table"})) : null);
  }

  // The fittest individual; among equals the latest (a network carried into later
  // generations), so its lineage shows how it got there.
  function best() {
    let top = null;
    for (const ind of individuals.values()) {
      if (ind.fitness === null || ind.fitness === undefined) continue;
      if (!top || ind.fitness > top.fitness || (ind.fitness === top.fitness && ind.id > top.id)) top = ind;
    }
    return top;
  }

  function drawEvolve() {
    const gens = [...generations.values()].sort((a, b) => a.generation - b.generation);
    const scored = [...individuals.values()].filter((i) => i.fitness !== null && i.fitness !== undefined);
    const chart = lineChart([
      {name: "best", points: gens.map((g) => [g.generation, g.best_fitness])},
      {name: "mean", points: gens.map((g) => [g.generation, g.mean_fitness]), dashed: true},
      {name: "individuals", points: scored.map((i) => [i.generation, i.fitness]), line: false, dots: true},
    ], {xLabel: "generation", yLabel: "fitness (validation accuracy)", xInteger: true, yDomain: [0, 1],
      yFormat: (v) => percent(v, 0), empty: "Waiting for the first individual…", title: "fitness by generation"});
    chart.id = "fitness-chart";
    const top = best();
    const tree = top ? lineage([...individuals.values()], top.id) : null;
    if (tree) tree.id = "lineage";
    const rows = [...individuals.values()].sort((a, b) => a.id - b.id).map((ind) => h("tr", {class: top && ind.id === top.id ? "highlight" : ""},
      h("td", {class: "num"}, ind.generation), h("td", {class: "num"}, `#${ind.id}`),
      h("td", {}, (ind.parents || []).map((p) => `#${p}`).join(", ") || "—"),
      h("td", {class: "num"}, percent(ind.fitness)), h("td", {class: "num"}, ind.epochs ?? "—"),
      h("td", {}, genomeSummary(ind.genome)),
      h("td", {}, ind.cached ? "from cache" : ind.job_id ? link(`#/jobs/${ind.job_id}`, shortId(ind.job_id), {class: "mono"}) : "—"),
      h("td", {}, ind.model_id ? link(`#/models/${ind.model_id}`, shortId(ind.model_id), {class: "mono"}) : "—")));
    replace(body,
      h("div", {class: "columns"},
        card("Fitness by generation", h("figure", {}, chart)),
        card("Lineage of the best", tree
          ? h("div", {}, h("p", {class: "muted"}, `Individual #${top.id} (${percent(top.fitness)}) and its ancestors.`),
            h("div", {class: "scroll-x"}, tree))
          : h("p", {class: "muted"}, "Appears once an individual has been scored."))),
      card("Individuals", rows.length ? table(["Gen.", "Individual", "Parents", "Fitness", "Epochs", "Network", "Train job", "Model"],
        rows, {id: "individuals-table"}) : h("p", {class: "muted"}, "None scored yet.")));
  }

  function drawResult() {
    const result = job.result;
    if (job.status !== "succeeded" || !result) {
      replace(resultArea);
      return;
    }
    const leaderboard = (result.leaderboard || []).slice(0, 10).map((entry, rank) => h("tr", {},
      h("td", {class: "num"}, rank + 1), h("td", {class: "num"}, `#${entry.id}`), h("td", {class: "num"}, entry.generation),
      h("td", {class: "num"}, percent(entry.fitness)), h("td", {class: "num"}, entry.epochs),
      h("td", {}, genomeSummary(entry.genome))));
    replace(resultArea,
      card("Result",
        facts([
          ["Model", result.model_id ? link(`#/models/${result.model_id}`, result.model_id, {class: "mono", id: "result-model"}) : "—"],
          ["Fitness (validation accuracy)", percent(result.fitness)],
          result.training_seconds !== undefined ? ["Training time", duration(result.training_seconds)] : null,
          result.elapsed !== undefined ? ["Evolution time", duration(result.elapsed)] : null,
          result.trained !== undefined ? ["Networks trained", `${result.trained} (${result.cache_hits} from cache)`] : null,
          result.stopped ? ["Stopped", result.stopped] : null,
        ]),
        h("h3", {}, "Test metrics"), metricTiles(result.metrics)),
      leaderboard.length ? card("Leaderboard", table(["Rank", "Individual", "Gen.", "Fitness", "Epochs", "Network"],
        leaderboard, {id: "leaderboard"})) : null);
  }

  let pending = null;
  function schedule() {
    if (pending) return;
    pending = setTimeout(() => {
      pending = null;
      if (signal.aborted) return;
      drawSummary();
      if (job.kind === "evolve") drawEvolve();
      else drawTrain();
      drawResult();
    }, REDRAW_MS);
  }

  replace(main,
    h("div", {class: "page-head"},
      h("div", {}, h("p", {class: "crumbs"}, link("#/jobs", "Jobs"), " / "),
        h("h1", {}, `${job.kind === "evolve" ? "Evolve" : "Train"} job `, h("span", {class: "mono"}, shortId(job.id)), " ", badge, " ", liveNote)),
      h("div", {class: "head-actions"}, cancelButton)),
    actionError, progressArea, summary, body, resultArea);
  schedule();

  function onEvent({type, data}) {
    if (type === "status") {
      job = {...job, status: data.status, attempts: data.attempts, error: data.error, progress: data.progress};
      if (data.status === "running" && !job.started_at) job.started_at = new Date().toISOString();
    } else if (type === "epoch") {
      epochs.set(data.epoch, data);
    } else if (type === "individual") {
      individuals.set(data.id, data);
    } else if (type === "generation") {
      generations.set(data.generation, data);
    } else if (type === "cancel_requested") {
      job = {...job, cancel_requested: true};
    } else if (type === "end") {
      job = {...job, ...data};
      if (job.kind === "train" && job.result?.history) {
        for (const e of job.result.history) epochs.set(e.epoch, e);
      }
      if (job.kind === "evolve" && job.result?.generations) {
        for (const g of job.result.generations) {
          generations.set(g.generation, g);
          for (const ind of g.individuals) {
            if (ind.budget !== 0) individuals.set(ind.id, {...individuals.get(ind.id), ...ind, generation: g.generation});
          }
        }
      }
      live = "ended";
    }
    schedule();
  }

  try {
    await followEvents(`/v1/jobs/${encodeURIComponent(job.id)}/events`, {
      signal, onEvent,
      onConnect: () => {
        live = "live";
        schedule();
      },
      onDisconnect: () => {
        live = "reconnecting";
        schedule();
      },
    });
  } catch (error) {
    if (signal.aborted) return;
    live = "ended";
    replace(actionError, errorBox(`The job's event stream stopped: ${error.message}`));
  }
  if (live !== "ended" && !signal.aborted) {
    live = "ended";
    schedule();
  }
}
