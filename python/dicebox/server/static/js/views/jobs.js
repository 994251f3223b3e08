// Jobs: a form to submit train and evolve jobs, and the list of jobs with their live status
// (re-read every few seconds while the page is open).

import {api} from "../api.js";
import {between, card, duration, errorBox, h, link, notice, progressBar, replace, shortId, sleep,
  statusBadge, table, when} from "../dom.js";

const REFRESH_MS = 2000;
const UNFINISHED = new Set(["queued", "running"]);

// A starting point for a train job: a small convolutional network that suits small images
// (at least 4 x 4 pixels: two 2 x 2 poolings). Edit it in the form.
const STARTER_GENOME = {
  optimizer: {name: "adam", learning_rate: 0.001},
  layers: [
    {type: "conv2d", filters: 16, kernel: [3, 3], padding: "same", activation: "relu"},
    {type: "maxpool2d", kernel: [2, 2]},
    {type: "conv2d", filters: 32, kernel: [3, 3], padding: "same", activation: "relu"},
    {type: "maxpool2d", kernel: [2, 2]},
    {type: "dropout", rate: 0.25},
    {type: "dense", size: 64, activation: "relu"},
  ],
};

function field(label, control, help) {
  return h("label", {class: "field"}, h("span", {}, label), control, help ? h("small", {class: "muted"}, help) : null);
}

function numberInput(name, value, attrs = {}) {
  return h("input", {name, type: "number", value: String(value), step: "any", ...attrs});
}

function jobForm(datasets, preselected, navigate) {
  const message = h("div", {id: "job-form-message"});
  const kindTrain = h("input", {type: "radio", name: "kind", value: "train", checked: true, id: "kind-train"});
  const kindEvolve = h("input", {type: "radio", name: "kind", value: "evolve", id: "kind-evolve"});
  const datasetSelect = h("select", {name: "dataset", required: true, id: "job-dataset"},
    datasets.map((d) => h("option", {value: d.name, selected: d.name === preselected},
      `${d.name} (${d.count.toLocaleString("en-US")} images)`)));
  const genome = h("textarea", {name: "genome", rows: "12", spellcheck: "false", class: "code", id: "job-genome"});
  genome.value = JSON.stringify(STARTER_GENOME, null, 2);

  const trainPart = h("fieldset", {class: "form-grid part", id: "train-part"},
    h("legend", {}, "Network"),
    h("label", {class: "field wide"}, h("span", {}, "Genome (JSON)"), genome),
    field("Warm start from", h("input", {name: "init", placeholder: "model id or best (optional)"})));
  const evolvePart = h("fieldset", {class: "form-grid part", id: "evolve-part", hidden: true},
    h("legend", {}, "Evolution"),
    field("Population", numberInput("population", 8, {min: "2", step: "1"})),
    field("Generations", numberInput("generations", 3, {min: "1", step: "1"})),
    field("Retain", numberInput("retain", 0.4, {min: "0", max: "1"}), "share of the best kept"),
    field("Random select", numberInput("random_select", 0.1, {min: "0", max: "1"})),
    field("Mutation chance", numberInput("mutate_chance", 0.2, {min: "0", max: "1"})),
    field("Search space", h("select", {name: "space"},
      h("option", {value: "default"}, "default (CNNs)"), h("option", {value: "original"}, "original (dense)"))),
    field("Time budget (s)", h("input", {name: "time_budget", type: "number", min: "1", step: "any",
      placeholder: "none"})),
    field("Schedule", h("select", {name: "schedule"},
      h("option", {value: ""}, "full epochs"), h("option", {value: "halving"}, "successive halving"))));

  const form = h("form", {id: "job-form"},
    h("div", {class: "segmented", role: "radiogroup", "aria-label": "Job kind"},
      h("label", {}, kindTrain, h("span", {}, "Train a network")),
      h("label", {}, kindEvolve, h("span", {}, "Evolve networks"))),
    h("div", {class: "form-grid"}, field("Dataset", datasetSelect)),
    trainPart, evolvePart,
    h("fieldset", {class: "form-grid part"},
      h("legend", {}, "Training"),
      field("Epochs", numberInput("epochs", 10, {min: "1", step: "1", id: "job-epochs"}), "per network"),
      field("Batch size", numberInput("batch_size", 64, {min: "1", step: "1"})),
      field("Patience", numberInput("patience", 5, {min: "0", step: "1"}), "epochs without improvement"),
      field("Validation", numberInput("validation", 0.1, {min: "0", max: "0.5"}), "share of the images"),
      field("Test", numberInput("test", 0.1, {min: "0", max: "0.5"}), "share of the images"),
      field("Seed", numberInput("seed", 0, {min: "0", step: "1"})),
      field("Augment", numberInput("augment", 0, {min: "0", max: "1"})),
      field("Label smoothing", numberInput("label_smoothing", 0, {min: "0", max: "0.99"})),
      field("Priority", numberInput("priority", 0, {min: "-100", max: "100", step: "1"}), "higher runs first")),
    h("div", {class: "actions"}, h("button", {type: "submit", class: "button", id: "job-submit"}, "Submit job")),
    message);

  const showKind = () => {
    trainPart.hidden = !kindTrain.checked;
    evolvePart.hidden = kindTrain.checked;
  };
  kindTrain.addEventListener("change", showKind);
  kindEvolve.addEventListener("change", showKind);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    replace(message);
    const data = new FormData(form);
    const num = (name) => Number(data.get(name));
    const body = {
      kind: data.get("kind"),
      dataset: data.get("dataset"),
      priority: num("priority"),
      params: {epochs: num("epochs"), batch_size: num("batch_size"), patience: num("patience"),
        seed: num("seed"), augment: num("augment"), label_smoothing: num("label_smoothing"),
        validation: num("validation"), test: num("test")},
    };
    if (body.kind === "train") {
      try {
        body.genome = JSON.parse(data.get("genome"));
      } catch (error) {
        replace(message, errorBox(`genome: not valid JSON (${error.message})`));
        return;
      }
      const init = data.get("init").trim();
      if (init) body.init = init;
    } else {
      body.evolution = {population: num("population"), generations: num("generations"), retain: num("retain"),
        random_select: num("random_select"), mutate_chance: num("mutate_chance"), space: data.get("space")};
      if (data.get("time_budget")) body.evolution.time_budget = num("time_budget");
      if (data.get("schedule")) body.evolution.schedule = data.get("schedule");
    }
    try {
      const job = await api("/v1/jobs", {method: "POST", json: body});
      navigate(`/jobs/${job.id}`);
    } catch (error) {
      replace(message, errorBox(error));
    }
  });
  return form;
}

function jobRow(job, onCancel) {
  const cancel = UNFINISHED.has(job.status) && !job.cancel_requested
    ? h("button", {type: "button", class: "button small secondary", onclick: () => onCancel(job)}, "Cancel")
    : null;
  return h("tr", {dataset: {job: job.id}},
    h("td", {}, link(`#/jobs/${job.id}`, shortId(job.id), {class: "mono"})),
    h("td", {}, job.kind),
    h("td", {}, job.dataset ? link(`#/datasets/${encodeURIComponent(job.dataset)}`, job.dataset) : "—"),
    h("td", {}, statusBadge(job.status)),
    h("td", {}, progressBar(job.progress)),
    h("td", {class: "num"}, `${job.attempts}/${job.max_attempts}`),
    h("td", {}, when(job.created_at)),
    h("td", {}, job.started_at ? duration(between(job.started_at, job.finished_at)) : "—"),
    h("td", {}, job.parent_id ? link(`#/jobs/${job.parent_id}`, shortId(job.parent_id), {class: "mono"}) : ""),
    h("td", {class: "row-actions"}, cancel));
}

export async function jobsView(main, {query, signal, navigate}) {
  const {items: datasets} = await api("/v1/datasets", {query: {limit: 1000}, signal});
  const listArea = h("div", {id: "jobs-list"});
  const statusFilter = h("select", {id: "status-filter"},
    ["", "queued", "running", "succeeded", "failed", "canceled"].map((s) =>
      h("option", {value: s}, s || "any status")));
  const children = h("input", {type: "checkbox", id: "show-children"});
  const listError = h("div");

  async function cancel(job) {
    try {
      await api(`/v1/jobs/${job.id}/cancel`, {method: "POST"});
      await refresh();
    } catch (error) {
      replace(listError, errorBox(error));
    }
  }

  async function refresh() {
    const {items} = await api("/v1/jobs", {query: {limit: 200, status: statusFilter.value}, signal});
    const shown = children.checked ? items : items.filter((j) => !j.parent_id);
    replace(listArea, shown.length
      ? table(["Job", "Kind", "Dataset", "Status", "Progress", "Attempts", "Submitted", "Ran", "Parent", ""],
        shown.map((job) => jobRow(job, cancel)), {id: "jobs-table"})
      : notice("No jobs to show."));
  }
  statusFilter.addEventListener("change", refresh);
  children.addEventListener("change", refresh);

  const formCard = datasets.length
    ? card("Submit a job", jobForm(datasets, query.get("dataset"), navigate))
    : card("Submit a job", notice("Create a dataset and add images to it first."), link("#/datasets", "Datasets"));
  const listCard = card("Jobs",
    h("div", {class: "toolbar"},
      h("label", {class: "inline"}, h("span", {}, "Status"), statusFilter),
      h("label", {class: "inline"}, children, h("span", {}, "Show the train jobs of evolutions"))),
    listError, listArea);
  // Coming from a dataset's "Train" button the form comes first; otherwise the list does.
  replace(main, h("div", {class: "page-head"}, h("h1", {}, "Jobs")),
    ...(query.has("dataset") ? [formCard, listCard] : [listCard, formCard]));
  await refresh();
  // Live status: re-read the list until the user leaves the page.
  (async () => {
    while (!signal.aborted) {
      await sleep(REFRESH_MS, signal);
      if (signal.aborted) return;
      try {
        await refresh();
        replace(listError);
      } catch (error) {
        if (signal.aborted || error.status === 401) return;
        replace(listError, errorBox(`Could not refresh the list: ${error.message}`));
      }
    }
  })();
}
