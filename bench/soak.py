"""Soak test of the service: a long run of mixed load against ``dicebox serve --workers 2``
(a real server with two processors on a loopback port, in a fresh home), checking that no
request fails that should succeed, that no job is lost, and that no process's memory grows.

Load, all at once for ``--duration`` seconds, from this one asyncio process:

- ``--clients`` (16) classify clients, back to back, each on its own keep-alive connection:
  one real dice PNG per request (every tenth request four), JSON or multipart, mostly to
  ``/v1/models/best/classify?dataset=...``, every fifth to one of the 20 newest models by id
  (so the server's model cache keeps loading and evicting models);
- two uploaders (one multipart, one JSON), a batch of 5-30 dice every ``--upload-every`` s,
  into the trained dataset until it holds ``--train-images`` (early in the warm-up), then
  into a second dataset (so the data the processors train on stops growing, and their memory
  after the warm-up measures leaks rather than a bigger dataset);
- a job submitter: small train jobs (at most ``--queue-depth`` of its own queued or running,
  one every ``--train-every`` s at most; one in eight canceled on purpose just after its
  submission) and a small evolve job every ``--evolve-every`` s (the first at a tenth of the
  run);
- readers: job lists and job show, the SSE event stream of every third train job followed
  to its end, dataset and model reads, ``/metrics``;
- a prober sending deliberately bad requests (corrupt images, unknown models and datasets,
  bad categories, over-budget jobs...) about every ``--probe-every`` s, each of which must
  be refused with its 4xx.

Every request's outcome is counted per kind: ``ok``, ``expected_4xx`` (a probe refused as it
should be), or unexpected: ``5xx``, ``status`` (another status than expected), ``connection``,
``timeout``, ``wrong_answer`` (a malformed answer, a prediction count or category that does
not match the request, the same model answering the same image differently, an upload not
adding what it was sent, an event stream not ending with the job's end).

At the end of the load the script waits (at most ``--drain-timeout`` s) for every submitted
job to end, then checks that none is lost: each exists and ended ``succeeded`` (or
``canceled``, only for jobs canceled on purpose), each succeeded job's model exists, each
evolve job's children all ended, and each dataset holds exactly its initial images plus
those the uploaders' requests acknowledged.

Memory: every ``--sample-every`` s the RSS, USS and PSS (psutil) of the server and of each of
its child processes (the processors) are sampled during the load. Growth of a process =
(``trend_end`` - ``baseline``) / ``baseline``, where ``baseline`` is the median RSS over the
last ``window`` seconds of the warm-up (``window`` = half the warm-up, at most 60 s) and
``trend_end`` is the least-squares line through every post-warm-up sample, evaluated at the
end of the load. The line uses all the samples, so one allocation spike at the end (a
processor in the middle of an epoch) moves it little, while a steady leak shows as its slope;
a step up after the warm-up that stays counts in full. Processes must stay below
``--growth-limit`` (10%); a processor that died and was restarted fails the run.

Exit status 1 when any request failed unexpectedly, any job is lost or ended badly, the
dataset count is off, or any process grew by the limit or more; 0 otherwise. A summary table
is printed and, with ``--json``, everything (including the memory samples) is written there.

    .venv/bin/python bench/soak.py [--duration 900] [--warmup 120] [--clients 16]
        [--home DIR] [--seed 0] [--json bench/results/soak.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict, deque
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SIZE, Server, multipart_body, percentile, png_bytes, upload_dice, wait_job

import dicebox

DATASET = "soak"  # trained on and classified with
# Where the uploaders go once DATASET holds --train-images: the load on the upload path stays
# the same all run, while the data the processors train on stops growing, so that their
# memory after the warm-up measures leaks, not a dataset getting bigger.
UPLOADS_DATASET = "soak-uploads"
DATASETS = (DATASET, UPLOADS_DATASET)
INITIAL_IMAGES = {DATASET: 600, UPLOADS_DATASET: 0}
FINISHED = ("succeeded", "failed", "canceled")
JOB_STATUSES = ("queued", "running", *FINISHED)
MODEL_ID = re.compile(r"[0-9a-f]{32}")
# A sane bound for any one request on a busy 2-core machine: far above any normal latency,
# so a request that takes this long is a failure, not noise.
REQUEST_TIMEOUT = 60.0
# The same model classifying the same image may differ by float rounding between batch
# compositions, never by more than this.
PROBABILITY_TOLERANCE = 1e-3
RECENT_MODELS = 20
MAX_EVENT_STREAMS = 3
UNEXPECTED_EXAMPLES = 50

TRAIN_SIZES = (16, 32, 64)
# Evolve jobs small enough to finish in seconds: dense networks only, two generations of four.
EVOLVE_SPEC = {"population": 4, "generations": 2,
               "space": {"layer_types": ["dense"], "min_layers": 1, "max_layers": 2,
                         "min_size": 8, "max_size": 64}}


def train_genome(size: int) -> dict[str, Any]:
    return {"optimizer": {"name": "adam", "learning_rate": 0.002},
            "layers": [{"type": "dense", "size": size, "activation": "relu"}]}


# -- outcomes ------------------------------------------------------------------------------------


class Tally:
    """Outcomes of every request by kind, classify latencies, and the first unexpected ones."""

    def __init__(self) -> None:
        self.outcomes: dict[str, Counter[str]] = defaultdict(Counter)
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.examples: list[dict[str, Any]] = []

    def ok(self, kind: str, seconds: float) -> None:
        self.outcomes[kind]["ok"] += 1
        self.latency[kind].append(seconds)

    def refused(self, kind: str) -> None:
        self.outcomes[kind]["expected_4xx"] += 1

    def unexpected(self, kind: str, reason: str, detail: str) -> None:
        self.outcomes[kind][reason] += 1
        if len(self.examples) < UNEXPECTED_EXAMPLES:
            self.examples.append({"kind": kind, "reason": reason, "detail": detail[:500],
                                  "at": time.time()})

    def unexpected_total(self) -> int:
        return sum(n for counts in self.outcomes.values() for outcome, n in counts.items()
                   if outcome not in ("ok", "expected_4xx"))


class Soak:
    """The load generators and the bookkeeping they share."""

    def __init__(self, url: str, args: argparse.Namespace, categories: list[str]) -> None:
        self.url, self.args, self.categories = url, args, categories
        self.tally = Tally()
        self.started = time.monotonic()
        self.deadline = self.started + args.duration
        self.client = httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT,
                                        limits=httpx.Limits(max_connections=32))
        self.acknowledged = dict.fromkeys(DATASETS, 0)  # images the uploads' answers added
        self.jobs: dict[str, dict[str, Any]] = {}  # id -> what was submitted and what we saw
        self.recent_models: deque[str] = deque(maxlen=RECENT_MODELS)
        self.answers: dict[tuple[str, int], tuple[str, float, float]] = {}
        self.event_streams = 0
        self.background: set[asyncio.Task] = set()
        self._make_images()

    def _make_images(self) -> None:
        seed = self.args.seed
        upload = dicebox.datasets.make_dice(count=1200, size=SIZE, seed=seed + 1)
        self.upload_pool: dict[str, list[bytes]] = defaultdict(list)
        for image, label in zip(upload.images, upload.labels, strict=True):
            self.upload_pool[upload.categories[int(label)]].append(png_bytes(image))
        queries = dicebox.datasets.make_dice(count=64, size=SIZE, seed=seed + 2)
        self.query_pngs = [png_bytes(image) for image in queries.images]
        self.query_b64 = [base64.b64encode(p).decode() for p in self.query_pngs]

    @property
    def running(self) -> bool:
        return time.monotonic() < self.deadline

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    async def call(self, kind: str, method: str, path: str, *, expect: tuple[int, ...] = (200,),
                   check=None, client: httpx.AsyncClient | None = None,
                   **kwargs) -> httpx.Response | None:
        """One request, its outcome counted under ``kind``. ``expect`` are the statuses it
        should get (a 4xx among them makes it a probe); ``check(response)`` returns what is
        wrong with a successful answer, or None. Returns the response when it was expected."""
        started = time.perf_counter()
        try:
            response = await (client or self.client).request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            self.tally.unexpected(kind, "timeout", f"{method} {path}: {exc!r}")
            return None
        except httpx.TransportError as exc:
            self.tally.unexpected(kind, "connection", f"{method} {path}: {exc!r}")
            return None
        seconds = time.perf_counter() - started
        status = response.status_code
        if status not in expect:
            reason = "5xx" if status >= 500 else "status"
            self.tally.unexpected(kind, reason, f"{method} {path}: {status} {response.text[:300]}")
            return None
        if status >= 400:
            self.tally.refused(kind)
            return response
        try:
            problem = check(response) if check is not None else None
        except (ValueError, LookupError, TypeError, AttributeError) as exc:  # not the answer's shape
            problem = f"unreadable answer ({exc!r}): {response.text[:200]}"
        if problem:
            self.tally.unexpected(kind, "wrong_answer", f"{method} {path}: {problem}")
            return None
        self.tally.ok(kind, seconds)
        return response

    def spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # -- classification ----------------------------------------------------------------------

    async def classify_client(self, index: int) -> None:
        rng = random.Random(f"{self.args.seed}-classify-{index}")
        use_json = index % 2 == 0
        async with httpx.AsyncClient(base_url=self.url, timeout=REQUEST_TIMEOUT,
                                     limits=httpx.Limits(max_connections=1)) as client:
            request = 0
            while self.running:
                request += 1
                count = 4 if request % 10 == 0 else 1
                picked = [rng.randrange(len(self.query_pngs)) for _ in range(count)]
                if request % 5 == 0 and self.recent_models:
                    path, params = f"/v1/models/{rng.choice(self.recent_models)}/classify", {}
                else:
                    path, params = "/v1/models/best/classify", {"dataset": DATASET}
                if use_json:
                    body = json.dumps({"items": [{"data": self.query_b64[i]} for i in picked]})
                    content_type = "application/json"
                else:
                    body, content_type = multipart_body([self.query_pngs[i] for i in picked])
                await self.call("classify", "POST", path, params=params, content=body,
                                headers={"Content-Type": content_type}, client=client,
                                check=lambda r, picked=picked: self.check_predictions(r, picked))

    def check_predictions(self, response: httpx.Response, picked: list[int]) -> str | None:
        body = response.json()
        model_id = body.get("model_id")
        if not isinstance(model_id, str) or not MODEL_ID.fullmatch(model_id):
            return f"model_id {model_id!r}"
        predictions = body.get("predictions")
        if not isinstance(predictions, list) or len(predictions) != len(picked):
            return f"{len(picked)} images, predictions {predictions!r:.200}"
        for image, prediction in zip(picked, predictions, strict=True):
            category, probability = prediction.get("category"), prediction.get("probability")
            top = prediction.get("top") or []
            if category not in self.categories or not 0.0 <= probability <= 1.0:
                return f"prediction {prediction!r:.200}"
            if not top or top[0]["category"] != category:
                return f"top {top!r:.200} does not start with {category!r}"
            margin = probability - top[1]["probability"] if len(top) > 1 else 1.0
            seen = self.answers.setdefault((model_id, image), (category, probability, margin))
            # A near tie may break either way under float rounding; otherwise the answer of
            # one model for one image never changes.
            near_tie = min(margin, seen[2]) < PROBABILITY_TOLERANCE
            if (seen[0] != category and not near_tie) or \
                    abs(seen[1] - probability) > PROBABILITY_TOLERANCE:
                return (f"model {model_id} image {image}: {category} {probability:.6f}, "
                        f"earlier {seen[0]} {seen[1]:.6f}")
        return None

    # -- uploads -------------------------------------------------------------------------------

    async def uploader(self, use_json: bool) -> None:
        rng = random.Random(f"{self.args.seed}-upload-{use_json}")
        kind = "upload_json" if use_json else "upload_multipart"
        while self.running:
            count = rng.randint(5, 30)
            if use_json:
                items = []
                for _ in range(count):
                    category = rng.choice(self.categories)
                    data = base64.b64encode(rng.choice(self.upload_pool[category])).decode()
                    items.append({"category": category, "data": data})
                kwargs: dict[str, Any] = {"json": {"items": items}}
            else:
                category = rng.choice(self.categories)
                files = [rng.choice(self.upload_pool[category]) for _ in range(count)]
                body, content_type = multipart_body(files, {"category": category})
                kwargs = {"content": body, "headers": {"Content-Type": content_type}}

            def added_all(response: httpx.Response, count: int = count) -> str | None:
                added = response.json().get("added")
                return None if added == count else f"sent {count} images, added {added!r}"

            dataset = DATASET if INITIAL_IMAGES[DATASET] + self.acknowledged[DATASET] \
                < self.args.train_images else UPLOADS_DATASET
            response = await self.call(kind, "POST", f"/v1/datasets/{dataset}/images",
                                       check=added_all, **kwargs)
            if response is not None:
                self.acknowledged[dataset] += count
            await asyncio.sleep(self.args.upload_every)

    # -- jobs ----------------------------------------------------------------------------------

    def outstanding(self, kind: str) -> int:
        return sum(1 for job in self.jobs.values()
                   if job["kind"] == kind and job["status"] not in FINISHED)

    async def submit(self, kind: str, body: dict[str, Any]) -> str | None:
        def accepted(response: httpx.Response) -> str | None:
            answer = response.json()
            ok = isinstance(answer.get("id"), str) and answer.get("status") in JOB_STATUSES
            return None if ok else f"submit answered {answer!r:.200}"

        response = await self.call(f"submit_{kind}", "POST", "/v1/jobs", json=body,
                                   expect=(202,), check=accepted)
        if response is None:
            return None
        job_id = response.json()["id"]
        self.jobs[job_id] = {"id": job_id, "kind": kind, "status": response.json()["status"],
                             "canceled_on_purpose": False, "cancel_answer": None,
                             "submitted_at": self.elapsed()}
        return job_id

    async def submitter(self) -> None:
        rng = random.Random(f"{self.args.seed}-jobs")
        next_evolve = self.args.duration * 0.1
        submitted = 0
        while self.running:
            if self.elapsed() >= next_evolve:
                next_evolve += self.args.evolve_every
                await self.submit("evolve", {"kind": "evolve", "dataset": DATASET,
                                             "evolution": EVOLVE_SPEC,
                                             "params": {"epochs": 1, "seed": rng.randrange(1000)}})
            if self.outstanding("train") < self.args.queue_depth:
                body = {"kind": "train", "dataset": DATASET,
                        "genome": train_genome(rng.choice(TRAIN_SIZES)),
                        "params": {"epochs": rng.choice((1, 2)), "seed": rng.randrange(1000)}}
                job_id = await self.submit("train", body)
                if job_id is not None:
                    submitted += 1
                    if submitted % 8 == 0:
                        await self.cancel(job_id)
                    elif submitted % 3 == 0 and self.event_streams < MAX_EVENT_STREAMS:
                        self.spawn(self.follow_events(job_id))
            await asyncio.sleep(self.args.train_every)

    async def cancel(self, job_id: str) -> None:
        def canceled_or_finished(response: httpx.Response) -> str | None:
            status = response.json().get("status")
            return None if status in JOB_STATUSES else f"cancel answered status {status!r}"

        self.jobs[job_id]["canceled_on_purpose"] = True
        response = await self.call("cancel", "POST", f"/v1/jobs/{job_id}/cancel",
                                   check=canceled_or_finished)
        if response is not None:
            self.jobs[job_id]["cancel_answer"] = response.json()["status"]

    async def watch_jobs(self, until_done: bool = False) -> None:
        """Follows every unfinished job (``GET /v1/jobs/{id}``) once a second; during the load
        until it ends, or (``until_done``) until every job has ended."""
        while self.running or until_done:
            pending = [job for job in self.jobs.values() if job["status"] not in FINISHED]
            if until_done and not pending:
                return
            for job in pending:
                response = await self.call("job_show", "GET", f"/v1/jobs/{job['id']}",
                                           check=self.check_job)
                if response is not None:
                    self.record_job(job, response.json())
            await asyncio.sleep(1.0)

    @staticmethod
    def check_job(response: httpx.Response) -> str | None:
        job = response.json()
        return None if job.get("status") in JOB_STATUSES else f"job {job!r:.200}"

    def record_job(self, job: dict[str, Any], seen: dict[str, Any]) -> None:
        job["status"], job["result"], job["error"] = seen["status"], seen["result"], seen["error"]
        model_id = (seen["result"] or {}).get("model_id")
        if seen["status"] == "succeeded" and job["kind"] == "train" and model_id:
            self.recent_models.append(model_id)

    async def follow_events(self, job_id: str) -> None:
        """Reads a job's SSE stream to its end: event ids must increase and the last event
        must be ``end`` with the job in a finished status."""
        self.event_streams += 1
        try:
            events, current = [], {}
            async with self.client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                if response.status_code != 200:
                    self.tally.unexpected("events", "5xx" if response.status_code >= 500
                                          else "status", f"{job_id}: {response.status_code}")
                    return
                async for line in response.aiter_lines():
                    if not line:
                        if current:
                            events.append(current)
                        current = {}
                    elif not line.startswith(":"):
                        field, _, value = line.partition(":")
                        current[field] = value.removeprefix(" ")
            try:
                ids = [int(e["id"]) for e in events if "id" in e]
                end = events[-1] if events else {}
                status = json.loads(end.get("data", "{}")).get("status") if end else None
            except (ValueError, AttributeError):
                ids, end, status = [], events[-1], None
            if end.get("event") != "end" or status not in FINISHED or ids != sorted(set(ids)):
                self.tally.unexpected("events", "wrong_answer",
                                      f"{job_id}: {len(events)} events, last {end!r:.200}")
            else:
                self.tally.ok("events", 0.0)
        except httpx.TimeoutException as exc:
            self.tally.unexpected("events", "timeout", f"{job_id}: {exc!r}")
        except httpx.TransportError as exc:
            self.tally.unexpected("events", "connection", f"{job_id}: {exc!r}")
        finally:
            self.event_streams -= 1

    # -- reads ---------------------------------------------------------------------------------

    async def reader(self) -> None:
        rng = random.Random(f"{self.args.seed}-reads")
        step = 0
        while self.running:
            step += 1
            choice = step % 6
            if choice == 0:
                await self.call("jobs_list", "GET", "/v1/jobs", params={"limit": 20},
                                check=lambda r: None if isinstance(r.json().get("items"), list)
                                else "no items")
            elif choice == 1:
                await self.call("jobs_list", "GET", "/v1/jobs",
                                params={"status": rng.choice(JOB_STATUSES), "limit": 5})
            elif choice == 2:
                dataset = DATASETS[step // 6 % 2]
                acknowledged = INITIAL_IMAGES[dataset] + self.acknowledged[dataset]

                def holds_acknowledged(r: httpx.Response, least: int = acknowledged) -> str | None:
                    count = r.json().get("count")
                    return None if count >= least else f"count {count} < acknowledged {least}"

                await self.call("dataset_show", "GET", f"/v1/datasets/{dataset}",
                                check=holds_acknowledged)
            elif choice == 3:
                await self.call("models_list", "GET", "/v1/models",
                                params={"dataset": DATASET, "limit": 5})
            elif choice == 4:
                await self.call("metrics", "GET", "/metrics",
                                check=lambda r: None if "dicebox_" in r.text else "no dicebox_ metrics")
            elif self.jobs:
                job_id = rng.choice(list(self.jobs))
                await self.call("job_show", "GET", f"/v1/jobs/{job_id}", check=self.check_job)
            await asyncio.sleep(self.args.read_every)

    # -- deliberately bad requests -------------------------------------------------------------

    def probes(self) -> list[tuple[str, str, str, dict[str, Any], tuple[int, ...]]]:
        """(kind, method, path, request arguments, the statuses that refuse it)."""
        not_png = base64.b64encode(b"this is not an image").decode()
        truncated = self.query_pngs[0][: len(self.query_pngs[0]) // 2]
        unknown = "0" * 32
        good_genome = train_genome(16)
        return [
            ("bad_classify", "POST", "/v1/models/best/classify",
             {"params": {"dataset": DATASET}, "json": {"items": [{"data": not_png}]}}, (400,)),
            ("bad_classify", "POST", f"/v1/models/{unknown}/classify",
             {"json": {"items": [{"data": self.query_b64[0]}]}}, (404,)),
            ("bad_classify", "POST", "/v1/models/best/classify",
             {"json": {"items": [{"data": self.query_b64[0]}]}}, (400,)),
            ("bad_classify", "POST", "/v1/models/best/classify",
             {"params": {"dataset": DATASET}, "content": b"hello",
              "headers": {"Content-Type": "text/plain"}}, (415,)),
            ("bad_upload", "POST", f"/v1/datasets/{DATASET}/images",
             {"json": {"items": [{"category": "../escape", "data": self.query_b64[0]}]}}, (400,)),
            ("bad_upload", "POST", f"/v1/datasets/{DATASET}/images",
             {"json": {"items": [{"category": self.categories[0], "data": self.query_b64[1]},
                                 {"category": self.categories[0],
                                  "data": base64.b64encode(truncated).decode()}]}}, (400,)),
            ("bad_upload", "POST", "/v1/datasets/no-such-dataset/images",
             {"json": {"items": [{"category": "1", "data": self.query_b64[0]}]}}, (404,)),
            ("bad_submit", "POST", "/v1/jobs",
             {"json": {"kind": "train", "dataset": "no-such-dataset", "genome": good_genome}},
             (404,)),
            ("bad_submit", "POST", "/v1/jobs",
             {"json": {"kind": "train", "dataset": DATASET, "genome": good_genome,
                       "params": {"epochs": 1_000_000}}}, (400,)),
            ("bad_submit", "POST", "/v1/jobs",
             {"json": {"kind": "train", "dataset": DATASET,
                       "genome": {"layers": [{"type": "no-such-layer"}]}}}, (400,)),
            ("bad_job", "GET", "/v1/jobs/no-such-job", {}, (404,)),
            ("bad_job", "POST", "/v1/jobs/no-such-job/cancel", {}, (404,)),
        ]

    async def prober(self) -> None:
        probes = self.probes()
        index = 0
        while self.running:
            kind, method, path, kwargs, refusals = probes[index % len(probes)]
            index += 1
            await self.call(kind, method, path, expect=refusals, **kwargs)
            await asyncio.sleep(self.args.probe_every)

    # -- the run -------------------------------------------------------------------------------

    async def run_load(self) -> None:
        workers = [self.classify_client(i) for i in range(self.args.clients)]
        workers += [self.uploader(False), self.uploader(True), self.submitter(),
                    self.watch_jobs(), self.reader(), self.prober()]
        await asyncio.gather(*workers)

    async def drain(self) -> float:
        """Waits for every submitted job and event stream to end (bounded); returns the
        seconds it took."""
        started = time.monotonic()
        try:
            await asyncio.wait_for(self.watch_jobs(until_done=True), self.args.drain_timeout)
        except asyncio.TimeoutError:
            pass
        if self.background:
            await asyncio.wait(self.background, timeout=REQUEST_TIMEOUT)
        return time.monotonic() - started


# -- the checks at the end -----------------------------------------------------------------------


async def check_jobs(soak: Soak) -> dict[str, Any]:
    """Every submitted job exists and ended as it should; models and children are there."""
    report: dict[str, Any] = {"submitted": Counter(), "statuses": Counter(), "lost": [],
                              "unfinished": [], "bad": [], "models_checked": 0,
                              "evolve_children": 0}
    for job in soak.jobs.values():
        report["submitted"][job["kind"]] += 1
        response = await soak.client.get(f"/v1/jobs/{job['id']}")
        if response.status_code != 200:
            report["lost"].append({"id": job["id"], "status_code": response.status_code})
            continue
        seen = response.json()
        report["statuses"][f"{job['kind']} {seen['status']}"] += 1
        if seen["status"] not in FINISHED:
            report["unfinished"].append({"id": job["id"], "status": seen["status"]})
            continue
        allowed = {"succeeded", "canceled"} if job["canceled_on_purpose"] else {"succeeded"}
        if job["cancel_answer"] == "canceled":
            allowed = {"canceled"}
        if seen["status"] not in allowed:
            report["bad"].append({"id": job["id"], "kind": job["kind"], "status": seen["status"],
                                  "error": seen["error"]})
            continue
        if seen["status"] != "succeeded":
            continue
        model_id = (seen["result"] or {}).get("model_id")
        model = await soak.client.get(f"/v1/models/{model_id}") if model_id else None
        if model is None or model.status_code != 200 or model.json().get("dataset") != DATASET:
            report["bad"].append({"id": job["id"], "kind": job["kind"],
                                  "problem": f"model {model_id!r} missing"})
            continue
        report["models_checked"] += 1
        if job["kind"] == "evolve":
            children = (await soak.client.get("/v1/jobs", params={"parent_id": job["id"],
                                                                  "limit": 1000})).json()["items"]
            report["evolve_children"] += len(children)
            for child in children:
                if child["status"] not in ("succeeded", "canceled"):
                    report["bad"].append({"id": child["id"], "kind": "evolve child",
                                          "status": child["status"], "error": child["error"]})
    report["submitted"], report["statuses"] = dict(report["submitted"]), dict(report["statuses"])
    return report


# -- memory --------------------------------------------------------------------------------------


class MemorySampler(threading.Thread):
    """Samples RSS/USS/PSS of the server and its child processes every ``interval`` s, on its
    own thread so that a busy event loop does not delay the samples."""

    def __init__(self, server_pid: int, interval: float, started: float) -> None:
        super().__init__(name="memory-sampler", daemon=True)
        self.server = psutil.Process(server_pid)
        self.interval, self.started = interval, started
        self.samples: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.stopping = threading.Event()

    @staticmethod
    def role(process: psutil.Process) -> str:
        """``server``, a processor's name (``local0``...) or ``child <pid>``."""
        try:
            cmdline = process.cmdline()
        except psutil.Error:
            return f"child {process.pid}"
        if "--name" in cmdline[:-1]:
            return "processor " + cmdline[cmdline.index("--name") + 1].rpartition(":")[2]
        return f"child {process.pid}"

    def sample(self) -> None:
        at = time.monotonic() - self.started
        load = os.getloadavg()[0]
        try:
            processes = [("server", self.server)] + \
                [(self.role(child), child) for child in self.server.children()]
        except psutil.Error:
            return
        for role, process in processes:
            try:
                info = process.memory_full_info()
            except psutil.Error:
                continue  # it ended between the listing and the read
            self.samples[role].append({"t": round(at, 2), "pid": process.pid, "rss": info.rss,
                                       "uss": info.uss, "pss": info.pss, "load": load})

    def run(self) -> None:
        while not self.stopping.is_set():
            self.sample()
            self.stopping.wait(self.interval)


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y over t."""
    if len(points) < 2:
        return (points[0][1] if points else 0.0), 0.0
    mean_t = statistics.fmean(t for t, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    slope = sum((t - mean_t) * (y - mean_y) for t, y in points) / spread if spread else 0.0
    return mean_y - slope * mean_t, slope


def memory_growth(samples: list[dict[str, Any]], warmup: float, end: float,
                  limit: float) -> dict[str, Any]:
    """The figures of one process (see the module docstring for the definition of growth)."""
    window = min(60.0, warmup / 2)
    pids = sorted({s["pid"] for s in samples})
    warm = [s for s in samples if warmup - window <= s["t"] <= warmup]
    post = [s for s in samples if s["t"] > warmup]
    out: dict[str, Any] = {"pids": pids, "samples": len(samples), "restarted": len(pids) > 1}
    if not warm or len(post) < 2:
        out.update(growth_pct=None, ok=False, problem="too few samples")
        return out
    baseline = statistics.median(s["rss"] for s in warm)
    intercept, slope = fit_line([(s["t"], s["rss"]) for s in post])
    trend_end = intercept + slope * end
    final_window = [s["rss"] for s in post if s["t"] >= end - window] or [post[-1]["rss"]]
    growth = 100.0 * (trend_end - baseline) / baseline
    out.update(
        baseline_rss=baseline, max_rss=max(s["rss"] for s in samples), final_rss=post[-1]["rss"],
        trend_end_rss=trend_end, slope_bytes_per_minute=slope * 60.0, growth_pct=growth,
        final_window_growth_pct=100.0 * (statistics.median(final_window) - baseline) / baseline,
        baseline_uss=statistics.median(s["uss"] for s in warm), final_uss=post[-1]["uss"],
        baseline_pss=statistics.median(s["pss"] for s in warm), final_pss=post[-1]["pss"],
        ok=growth < limit and len(pids) == 1)
    if len(pids) > 1:
        out["problem"] = "restarted (a new pid)"
    return out


# -- report --------------------------------------------------------------------------------------


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f}"


def print_summary(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a log file: room for the memory table on one line a row
        console.width = 160
    seconds = result["load_seconds"]
    requests = Table(title=f"requests over {seconds:.0f} s of load")
    for column in ("kind", "ok", "expected 4xx", "unexpected", "per s"):
        requests.add_column(column, justify="left" if column == "kind" else "right")
    for kind, counts in sorted(result["requests"].items()):
        bad = {k: v for k, v in counts.items() if k not in ("ok", "expected_4xx", "per_second")}
        requests.add_row(kind, str(counts.get("ok", 0)), str(counts.get("expected_4xx", 0)),
                         ", ".join(f"{k} {v}" for k, v in bad.items()) or "0",
                         f"{counts['per_second']:.1f}")
    console.print(requests)
    latency = result["classify_latency_ms"]
    console.print(f"classify latency (client side, {latency['count']} requests): p50 "
                  f"{latency['p50']:.1f} ms, p99 {latency['p99']:.1f} ms, max {latency['max']:.1f} ms")

    memory = Table(title=f"memory (RSS MiB; growth = line through post-warm-up samples at the end"
                         f" vs the warm-up median; limit {result['config']['growth_limit']}%)")
    for column in ("process", "warm-up", "max", "final", "trend end", "growth %",
                   "final-window %", "USS warm-up/final", "PSS warm-up/final", "ok"):
        memory.add_column(column, justify="left" if column == "process" else "right")
    for role, m in result["memory"].items():
        growth = m.get("growth_pct")
        memory.add_row(role, mib(m.get("baseline_rss")), mib(m.get("max_rss")),
                       mib(m.get("final_rss")), mib(m.get("trend_end_rss")),
                       "-" if growth is None else f"{growth:+.1f}",
                       "-" if growth is None else f"{m['final_window_growth_pct']:+.1f}",
                       f"{mib(m.get('baseline_uss'))} / {mib(m.get('final_uss'))}",
                       f"{mib(m.get('baseline_pss'))} / {mib(m.get('final_pss'))}",
                       "yes" if m["ok"] else f"NO ({m.get('problem', 'growth')})")
    console.print(memory)

    jobs = result["jobs"]
    console.print(f"jobs: submitted {jobs['submitted']}, ended {jobs['statuses']}, evolve children "
                  f"{jobs['evolve_children']}, models checked {jobs['models_checked']}, lost "
                  f"{len(jobs['lost'])}, unfinished {len(jobs['unfinished'])}, bad {len(jobs['bad'])}"
                  f" (drained in {result['drain_seconds']:.1f} s)")
    for name, dataset in result["datasets"].items():
        console.print(f"dataset {name}: {dataset['initial']} initial + {dataset['acknowledged']}"
                      f" acknowledged = {dataset['expected']}, the server holds {dataset['final']}")
    for example in result["unexpected_examples"][:10]:
        console.print(f"[red]unexpected[/red] {example['kind']} {example['reason']}: "
                      f"{example['detail'][:200]}")
    verdict = result["verdict"]
    colour = "green" if verdict["passed"] else "red"
    console.print(f"[{colour}]verdict: {'PASSED' if verdict['passed'] else 'FAILED'}[/{colour}] "
                  f"{json.dumps({k: v for k, v in verdict.items() if k != 'passed'})}")


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=900.0, help="seconds of load")
    ap.add_argument("--warmup", type=float, default=120.0,
                    help="seconds of load before the memory baseline (a value below 1 is a "
                         "fraction of --duration)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent classify clients")
    ap.add_argument("--home", type=Path, help="the server's home (default: a temporary one, "
                                               "kept only when the run fails)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the full result here")
    ap.add_argument("--sample-every", type=float, default=5.0, help="memory sampling period, s")
    ap.add_argument("--growth-limit", type=float, default=10.0, help="memory growth limit, %%")
    ap.add_argument("--upload-every", type=float, default=2.0, help="pause of each uploader, s")
    ap.add_argument("--train-images", type=int, default=2400,
                    help="images of the trained dataset after which uploads go to another one")
    ap.add_argument("--train-every", type=float, default=1.0,
                    help="least time between two train submissions, s")
    ap.add_argument("--queue-depth", type=int, default=2,
                    help="train jobs of the submitter queued or running at most")
    ap.add_argument("--evolve-every", type=float, default=180.0, help="s between evolve jobs")
    ap.add_argument("--read-every", type=float, default=0.5, help="pause of the reader, s")
    ap.add_argument("--probe-every", type=float, default=2.0, help="pause of the prober, s")
    ap.add_argument("--drain-timeout", type=float, default=300.0,
                    help="longest wait for the submitted jobs after the load, s")
    args = ap.parse_args(argv)
    if args.warmup < 1:
        args.warmup *= args.duration
    if not 0 < args.warmup < args.duration:
        ap.error("--warmup must be shorter than --duration")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    temporary = args.home is None
    home = Path(tempfile.mkdtemp(prefix="dicebox-soak-")) if temporary else args.home
    home.mkdir(parents=True, exist_ok=True)
    print(f"home {home}; {args.duration:.0f} s of load, warm-up {args.warmup:.0f} s, "
          f"{args.clients} classify clients, load average {os.getloadavg()[0]:.1f}", flush=True)
    server = Server(home, workers=2)
    passed = False
    try:
        with server.client() as client:
            info = upload_dice(client, DATASET, INITIAL_IMAGES[DATASET], seed=args.seed,
                               multipart=False)
            created = client.post("/v1/datasets", json={"name": UPLOADS_DATASET, "width": SIZE,
                                                         "height": SIZE, "channels": 1})
            created.raise_for_status()
            categories = [c["name"] for c in info["categories"]]
            first = client.post("/v1/jobs", json={"kind": "train", "dataset": DATASET,
                                                  "genome": train_genome(32),
                                                  "params": {"epochs": 2}})
            first_job = wait_job(client, first.json()["id"], timeout=300)
            if first_job["status"] != "succeeded":
                raise SystemExit(f"the first train job ended {first_job['status']}: "
                                 f"{first_job['error']}")
        result = asyncio.run(run(server, args, categories))
        passed = result["verdict"]["passed"]
    finally:
        code = server.stop()
        log = server.log.read_text(errors="replace")
        if temporary and passed:
            shutil.rmtree(home, ignore_errors=True)
        elif not passed:
            print(f"home kept: {home}", flush=True)
    result["server_exit_code"] = code
    result["server_log_tracebacks"] = log.count("Traceback")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    print_summary(result)
    if result["server_log_tracebacks"]:
        print(f"note: {result['server_log_tracebacks']} tracebacks in the server's log")
    return 0 if passed else 1


async def run(server: Server, args: argparse.Namespace, categories: list[str]) -> dict[str, Any]:
    soak = Soak(server.url, args, categories)
    async with soak.client:
        response = await soak.client.get("/v1/models", params={"dataset": DATASET})
        soak.recent_models.extend(m["id"] for m in response.json()["items"])
        sampler = MemorySampler(server.proc.pid, args.sample_every, soak.started)
        sampler.start()
        await soak.run_load()
        load_seconds = soak.elapsed()
        sampler.stopping.set()
        sampler.join()
        drain_seconds = await soak.drain()
        jobs = await check_jobs(soak)
        datasets = {}
        for name in DATASETS:
            final = (await soak.client.get(f"/v1/datasets/{name}")).json()["count"]
            datasets[name] = {"initial": INITIAL_IMAGES[name],
                              "acknowledged": soak.acknowledged[name],
                              "expected": INITIAL_IMAGES[name] + soak.acknowledged[name],
                              "final": final}

    requests = {}
    for kind, counts in soak.tally.outcomes.items():
        requests[kind] = dict(counts, per_second=sum(counts.values()) / load_seconds)
    latencies = [1000 * s for s in soak.tally.latency["classify"]] or [0.0]
    memory = {role: memory_growth(samples, args.warmup, args.duration, args.growth_limit)
              for role, samples in sorted(soak_samples(sampler).items())}
    verdict = {
        "unexpected_errors": soak.tally.unexpected_total(),
        "lost_jobs": len(jobs["lost"]) + len(jobs["unfinished"]),
        "bad_jobs": len(jobs["bad"]),
        "dataset_count_ok": all(d["final"] == d["expected"] for d in datasets.values()),
        "memory_ok": all(m["ok"] for m in memory.values()) and len(memory) >= 3,
        "max_growth_pct": max((m["growth_pct"] for m in memory.values()
                               if m.get("growth_pct") is not None), default=None),
    }
    verdict["passed"] = (verdict["unexpected_errors"] == 0 and verdict["lost_jobs"] == 0
                         and verdict["bad_jobs"] == 0 and verdict["dataset_count_ok"]
                         and verdict["memory_ok"])
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpus": os.cpu_count(), "load_seconds": load_seconds, "drain_seconds": drain_seconds,
        "requests": requests,
        "classify_latency_ms": {"count": len(soak.tally.latency["classify"]),
                                "p50": percentile(latencies, 0.50),
                                "p99": percentile(latencies, 0.99), "max": max(latencies)},
        "jobs": jobs,
        "datasets": datasets,
        "memory": memory,
        "memory_samples": soak_samples(sampler),
        "unexpected_examples": soak.tally.examples,
        "verdict": verdict,
    }


def soak_samples(sampler: MemorySampler) -> dict[str, list[dict[str, Any]]]:
    """The samples of the server and the processors (other children come and go)."""
    return {role: samples for role, samples in sampler.samples.items()
            if not role.startswith("child ")}


if __name__ == "__main__":
    sys.exit(main())
