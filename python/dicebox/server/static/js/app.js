// The dashboard's entry point: the layout, the API-key prompt and the router that shows one
// view per URL fragment (#/datasets, #/jobs/ID, ...). Each view renders into <main> and
// gets an AbortSignal that fires when the user leaves it, which stops its requests, event
// streams and timers.

import {api, forgetKey, getKey, onUnauthorized, setKey} from "./api.js";
import {errorBox, h, replace} from "./dom.js";
import {classifyView} from "./views/classify.js";
import {datasetView, datasetsView} from "./views/datasets.js";
import {jobView} from "./views/job.js";
import {jobsView} from "./views/jobs.js";
import {modelView, modelsView} from "./views/models.js";

const ROUTES = [
  [/^\/datasets$/, datasetsView, "datasets"],
  [/^\/datasets\/([^/]+)$/, datasetView, "datasets"],
  [/^\/jobs$/, jobsView, "jobs"],
  [/^\/jobs\/([^/]+)$/, jobView, "jobs"],
  [/^\/models$/, modelsView, "models"],
  [/^\/models\/([^/]+)$/, modelView, "models"],
  [/^\/classify$/, classifyView, "classify"],
];

const main = document.getElementById("view");
const keyPanel = document.getElementById("key-panel");
const keyForm = document.getElementById("key-form");
const keyInput = document.getElementById("api-key");
const keyMessage = document.getElementById("key-message");
const keyStatus = document.getElementById("key-status");
const keyButton = document.getElementById("key-button");

let current = null;

function parseLocation() {
  const fragment = location.hash.replace(/^#/, "") || "/datasets";
  const [path, search = ""] = fragment.split("?");
  return {path, query: new URLSearchParams(search)};
}

/** Goes to a view: navigate("/jobs/ID"). */
export function navigate(path) {
  location.hash = `#${path}`;
}

async function render() {
  current?.abort();
  const controller = new AbortController();
  current = controller;
  const {path, query} = parseLocation();
  const match = ROUTES.map(([pattern, view, section]) => [path.match(pattern), view, section])
    .find(([found]) => found);
  for (const item of document.querySelectorAll("nav a")) {
    item.classList.toggle("active", Boolean(match) && item.dataset.section === match[2]);
  }
  if (!match) {
    replace(main, h("h1", {}, "Not found"), h("p", {}, "No page here. ", h("a", {href: "#/datasets"}, "Go to the datasets.")));
    return;
  }
  const [found, view] = match;
  replace(main, h("p", {class: "muted loading"}, "Loading…"));
  const params = found.slice(1).map(decodeURIComponent);
  try {
    await view(main, {params, query, signal: controller.signal, navigate});
  } catch (error) {
    if (controller.signal.aborted || error.name === "AbortError") return;
    if (error.status === 401) {
      replace(main, h("p", {class: "muted"}, "Enter the API key to see this page."));
      return;
    }
    replace(main, h("h1", {}, "Something went wrong"), errorBox(error));
  }
}

function showKeyStatus() {
  const key = getKey();
  keyStatus.textContent = key ? "API key set" : "No API key";
  keyButton.textContent = key ? "Forget key" : "Enter key";
}

function askForKey(message, refused = false) {
  keyMessage.textContent = message;
  keyMessage.hidden = !message;
  keyMessage.className = refused ? "error" : "info";
  keyPanel.hidden = false;
  keyInput.value = "";
  keyInput.focus();
}

// A 401 means the key is missing or was refused: forget a refused key and ask again, saying
// what the server answered.
onUnauthorized((message) => {
  const hadKey = Boolean(getKey());
  forgetKey();
  showKeyStatus();
  if (hadKey) askForKey(`The server refused the key: ${message}.`, true);
  else askForKey("This server needs an API key.");
});

keyForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = keyInput.value.trim();
  if (!key) {
    askForKey("Enter a key.", true);
    return;
  }
  setKey(key);
  showKeyStatus();
  try {
    await api("/v1/datasets", {query: {limit: 1}});
  } catch (error) {
    if (error.status !== 401) {
      askForKey(`Could not check the key: ${error.message}`, true);
    }
    return;  // a 401 has asked again already
  }
  keyPanel.hidden = true;
  render();
});

keyButton.addEventListener("click", () => {
  if (getKey()) {
    forgetKey();
    showKeyStatus();
    replace(main, h("p", {class: "muted"}, "The key was forgotten."));
  }
  askForKey("");
});

window.addEventListener("hashchange", render);
showKeyStatus();
render();
