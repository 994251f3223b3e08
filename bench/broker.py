"""RabbitMQ benchmark (issue 6, item 8): job throughput and submit-to-running latency through
RabbitMQ beside the embedded queue, and an evolve job on 1 and on 2 processors.

Jobs: the procedure of bench/service.py, run twice with the same jobs and the same two
processors (one thread each): once on the embedded queue, once with ``DICEBOX_BROKER_URL``
(server and processors). N one-epoch train jobs on 600 dice images, submitted at once; jobs/s
from the first submission to the last completion. Submit-to-running on an idle processor:
one job at a time, ``started_at - created_at`` (both stamped by the server's clock: in
broker mode that spans the insert, the publish with its confirm, the delivery to the
processor and its ``/start`` call). A short extra run per mode counts the HTTP requests per
job by route from the server's access log (for docs/scaling.md).

Evolution: one seeded evolve job through RabbitMQ, run by the server's coordinator, whose
individuals are train jobs for the processors; first with one processor, then with two, each
processor pinned to its own core (``taskset -c N``) with one training thread. The same seed
gives the same individuals, so the two runs do the same work; the speed-up is the ratio of
the evolve job's ``finished_at - started_at``.

The broker is a private RabbitMQ node (tests/rabbit.py) unless ``--broker URL`` names one
(its dicebox queues are purged first).

    .venv/bin/python bench/broker.py [--jobs 500] [--idle 50] [--broker URL]
        [--population 20] [--generations 4] [--epochs 3] [--rounds 2]
        [--skip-jobs] [--skip-evolve]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from rabbit import PrivateBroker, purge_dicebox_queues  # tests/rabbit.py
from servers import Process, Processor, Server, base_env, free_port, upload_dice, wait_for
from service import GENOME, _all_jobs, _percentile, _seconds  # bench/service.py

import dicebox

FINISHED = ("succeeded", "failed", "canceled")
EVOLVE_SIZE = 32
EVOLVE_IMAGES = 3000
# Convolutional networks only: the default space draws many dense networks that train in
# tens of milliseconds here, which would measure the service's per-job overhead (about
# 0.1 s) rather than the training spread over processors. These take about 0.1-4 s.
EVOLVE_SPACE = {
    "layer_types": ["conv2d", "maxpool2d", "dropout"],
    "min_layers": 2,
    "max_layers": 4,
    "filters": [16, 32],
    "max_macs": 8_000_000,
}


# -- processes -----------------------------------------------------------------------------------------


class LoggedServer(Server):
    """``dicebox serve`` with uvicorn's access log on (``--log-level info``), to count the
    requests each job costs. Only for the counting runs: the log costs server time."""

    def __init__(self, home: Path, extra_env: dict[str, str]) -> None:
        self.home, self.api_key = home, None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**base_env(home, None), **extra_env}
        cmd = [
            sys.executable,
            "-m",
            "dicebox",
            "serve",
            "--port",
            str(self.port),
            "--workers",
            "0",
            "--log-level",
            "info",
        ]
        Process.__init__(self, cmd, env, home / f"server-{self.port}.log")
        self.wait_ready()


def pinned_processor(server: Server, name: str, core: int, extra_env: dict[str, str]) -> Process:
    """A processor with one training thread, pinned to ``core`` (``taskset -c``)."""
    env = {**base_env(server.home, server.api_key), "DICEBOX_THREADS": "1", **extra_env}
    cmd = [
        "taskset",
        "-c",
        str(core),
        sys.executable,
        "-m",
        "dicebox.processor",
        "--server",
        server.url,
        "--name",
        name,
    ]
    return Process(cmd, env, server.home / f"processor-{name}-{time.monotonic_ns()}.log")


@contextlib.contextmanager
def rabbitmq(url: str | None) -> Iterator[tuple[str, int | None]]:
    """The broker to use and the process group of its node (for its CPU time; None for a
    broker given by ``url``, whose dicebox queues are purged), else a private node."""
    if url:
        purge_dicebox_queues(url)
        yield url, None
        return
    with tempfile.TemporaryDirectory(prefix="dicebox-bench-rabbitmq-") as tmp:
        node = PrivateBroker(tmp)
        try:
            node.start()
            yield node.url, node._proc.pid  # its own session: the group id is its pid
        finally:
            node.close()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes ``pids`` so far (from /proc; gone ones count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def group_pids(pgid: int) -> list[int]:
    """Every process of process group ``pgid`` (a RabbitMQ node: the script, erl, epmd...)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid:  # pgrp (field 5)
            pids.append(int(stat.parent.name))
    return pids


def wait_consumers(broker_url: str, count: int) -> None:
    """Until ``count`` processors consume ``dicebox.jobs`` (so none misses the first jobs)."""
    import pika
    import pika.exceptions

    def consumers() -> int:
        connection = pika.BlockingConnection(pika.URLParameters(broker_url))
        try:
            return (
                connection.channel()
                .queue_declare("dicebox.jobs", passive=True)
                .method.consumer_count
            )
        except pika.exceptions.ChannelClosedByBroker:  # not declared yet
            return 0
        finally:
            if connection.is_open:
                connection.close()

    wait_for(lambda: consumers() == count, 120, 0.2, f"{count} consumer(s) on dicebox.jobs")


def mode_env(broker_url: str | None) -> dict[str, str]:
    return {"DICEBOX_BROKER_URL": broker_url} if broker_url else {}


# -- jobs ----------------------------------------------------------------------------------------------

TRAIN = {
    "kind": "train",
    "dataset": "bench",
    "genome": GENOME,
    "params": {"epochs": 1, "validation": 0.1, "test": 0.1},
}


def bench_jobs(
    n_jobs: int, n_idle: int, broker_url: str | None, broker_pgid: int | None = None
) -> dict:
    """bench/service.py's job benchmark, on the embedded queue or (``broker_url``) RabbitMQ;
    also the CPU time the server, the processors and the broker node (``broker_pgid``) spent
    per job under the load."""
    env = mode_env(broker_url)
    with tempfile.TemporaryDirectory() as home:
        server = Server(Path(home), extra_env=env)
        processors = [Processor(server, f"bench{i}", threads=1, extra_env=env) for i in range(2)]
        client = server.client()
        try:
            if broker_url:
                wait_consumers(broker_url, 2)
            upload_dice(client, "bench", 600, multipart=False)
            # Warm-up: both processors have fetched and cached the dataset export.
            warm = [submit(client, TRAIN, broker_url) for _ in range(4)]
            wait_for(
                lambda: all(
                    client.get(f"/v1/jobs/{j}").json()["status"] == "succeeded" for j in warm
                ),
                120,
                0.1,
                "warm-up jobs",
            )

            idle = []

            def finished(job_id: str) -> dict | None:
                job = client.get(f"/v1/jobs/{job_id}").json()
                return job if job["status"] == "succeeded" else None

            answer = []  # the submit's round trip (insert, and in broker mode publish + confirm)
            for _ in range(n_idle):
                posted = time.perf_counter()
                job_id = submit(client, TRAIN, broker_url)
                answer.append(time.perf_counter() - posted)
                job = wait_for(
                    lambda job_id=job_id: finished(job_id), 60, 0.005, "an idle-latency job"
                )
                idle.append(_seconds(job, "created_at", "started_at"))

            def cpu() -> dict[str, float]:
                return {
                    "server": cpu_seconds([server.proc.pid]),
                    "processors": cpu_seconds([p.proc.pid for p in processors]),
                    "broker": cpu_seconds(group_pids(broker_pgid)) if broker_pgid else 0.0,
                }

            cpu_before = cpu()
            started = time.perf_counter()
            ids = [submit(client, TRAIN, broker_url) for _ in range(n_jobs)]
            submitted = time.perf_counter() - started
            wanted = set(ids)

            def all_done() -> bool:
                queued = client.get("/v1/jobs", params={"status": "queued", "limit": 1}).json()[
                    "items"
                ]
                running = client.get("/v1/jobs", params={"status": "running", "limit": 1}).json()[
                    "items"
                ]
                return not queued and not running

            wait_for(all_done, 3600, 0.5, "the benchmark jobs")
            elapsed = time.perf_counter() - started
            cpu_after = cpu()
            jobs = [j for j in _all_jobs(client) if j["id"] in wanted]
            failed = [j for j in jobs if j["status"] != "succeeded"]
            loaded = [_seconds(j, "created_at", "started_at") for j in jobs]
            return {
                "jobs": n_jobs,
                "failed": len(failed),
                "seconds": elapsed,
                "jobs_per_second": n_jobs / elapsed,
                "submit_seconds": submitted,
                "idle_p50_ms": 1000 * statistics.median(idle),
                "idle_p95_ms": 1000 * _percentile(idle, 0.95),
                "submit_p50_ms": 1000 * statistics.median(answer),
                "loaded_p50_ms": 1000 * statistics.median(loaded),
                "loaded_p95_ms": 1000 * _percentile(loaded, 0.95),
                "cpu_ms_per_job": {
                    k: 1000 * (cpu_after[k] - cpu_before[k]) / n_jobs for k in cpu_before
                },
            }
        finally:
            client.close()
            for p in processors:
                p.stop()
            server.stop()


def submit(client: httpx.Client, body: dict, broker_url: str | None) -> str:
    r = client.post("/v1/jobs", json=body)
    r.raise_for_status()
    if broker_url and not r.json().get("published"):
        raise RuntimeError(f"job {r.json()['id']} was not confirmed by the broker")
    return r.json()["id"]


_ACCESS = re.compile(r'"(GET|POST|PUT|DELETE) (/[^ ?"]*)[^"]*" (\d{3})')
_IDS = re.compile(r"/[0-9a-f]{32}(?=/|$)")


def count_requests(n_jobs: int, broker_url: str | None) -> dict[str, float]:
    """HTTP requests per job by route (ids replaced by ``{id}``), from the access log of a
    server running ``n_jobs`` one-epoch jobs one after another on one processor (after a
    warm-up job, so the dataset download is not counted: later jobs revalidate it)."""
    env = mode_env(broker_url)
    with tempfile.TemporaryDirectory() as home:
        server = LoggedServer(Path(home), env)
        processor = Processor(server, "count", threads=1, extra_env=env)
        client = server.client()
        try:
            if broker_url:
                wait_consumers(broker_url, 1)
            upload_dice(client, "bench", 600, multipart=False)
            warm = submit(client, TRAIN, broker_url)
            wait_for(
                lambda: client.get(f"/v1/jobs/{warm}").json()["status"] in FINISHED,
                120,
                0.05,
                "warm-up",
            )
            time.sleep(1.0)  # let the warm-up's last requests reach the log
            before = len(server.output().splitlines())
            ids = [submit(client, TRAIN, broker_url) for _ in range(n_jobs)]
            for job_id in ids:
                wait_for(
                    lambda job_id=job_id: (
                        client.get(f"/v1/jobs/{job_id}").json()["status"] in FINISHED
                    ),
                    120,
                    0.05,
                    "a counted job",
                )
            time.sleep(1.0)
            lines = server.output().splitlines()[before:]
        finally:
            client.close()
            processor.stop()
            server.stop()
    routes: Counter = Counter()
    for line in lines:
        match = _ACCESS.search(line)
        if match:
            method, path, _status = match.groups()
            routes[f"{method} {_IDS.sub('/{id}', path)}"] += 1
    # The benchmark's own polling (GET /v1/jobs/{id}) is not a cost of the job.
    routes.pop("GET /v1/jobs/{id}", None)
    return {route: count / n_jobs for route, count in sorted(routes.items())}


# -- evolution -----------------------------------------------------------------------------------------


def evolve_body(population: int, generations: int, epochs: int) -> dict:
    return {
        "kind": "evolve",
        "dataset": "evolve",
        "evolution": {"population": population, "generations": generations, "space": EVOLVE_SPACE},
        "params": {"epochs": epochs, "patience": 0, "seed": 7, "validation": 0.15, "test": 0.15},
    }


def bench_evolve(
    n_processors: int, population: int, generations: int, epochs: int, broker_url: str
) -> dict:
    """One seeded evolve job through RabbitMQ with ``n_processors`` pinned processors."""
    purge_dicebox_queues(broker_url)
    env = mode_env(broker_url)
    cores = os.sched_getaffinity(0)
    if len(cores) < n_processors:
        raise SystemExit(
            f"need {n_processors} cores for {n_processors} pinned processors, have {len(cores)}"
        )
    with tempfile.TemporaryDirectory() as home:
        server = Server(
            Path(home), extra_env={**env, "DICEBOX_MAX_POPULATION": str(max(population, 20))}
        )
        processors = [
            pinned_processor(server, f"evolve{i}", core, env)
            for i, core in zip(range(n_processors), sorted(cores), strict=False)
        ]
        client = server.client()
        try:
            wait_consumers(broker_url, n_processors)
            upload_evolve_dataset(client)
            r = client.post("/v1/jobs", json=evolve_body(population, generations, epochs))
            r.raise_for_status()
            job_id = r.json()["id"]
            job = wait_for(
                lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["status"] in FINISHED and j,
                7200,
                0.5,
                "the evolve job",
            )
            if job["status"] != "succeeded":
                raise RuntimeError(f"the evolve job ended {job['status']}: {job['error']}")
            children = client.get("/v1/jobs", params={"parent_id": job_id, "limit": 1000}).json()[
                "items"
            ]
            trained = [c for c in children if c["status"] == "succeeded"]
            per_worker = Counter(_owner(client, c["id"]) for c in trained)
            return {
                "processors": n_processors,
                "seconds": _seconds(job, "started_at", "finished_at"),
                "fitness": job["result"]["fitness"],
                "genome": job["result"]["genome"],
                "trained": len(trained),
                "training_seconds": sum(c["result"]["training_seconds"] for c in trained),
                "per_worker": dict(per_worker),
            }
        finally:
            client.close()
            for p in processors:
                p.stop()
            server.stop()


def _owner(client: httpx.Client, job_id: str) -> str:
    """The processor that ran a child's last attempt (from its status events)."""
    from servers import read_sse

    owners = [
        e["data"]["owner"]
        for e in read_sse(client, f"/v1/jobs/{job_id}/events", timeout=60)
        if e.get("event") == "status" and e["data"]["status"] == "running"
    ]
    return owners[-1].rsplit(":", 1)[0] if owners else "?"


def upload_evolve_dataset(client: httpx.Client) -> None:
    """3000 dice of 32x32 through the REST API (base64 JSON, 200 per request)."""
    from servers import b64_png

    r = client.post(
        "/v1/datasets",
        json={"name": "evolve", "width": EVOLVE_SIZE, "height": EVOLVE_SIZE, "channels": 1},
    )
    r.raise_for_status()
    dice = dicebox.datasets.make_dice(count=EVOLVE_IMAGES, size=EVOLVE_SIZE, seed=3)
    for c, category in enumerate(dice.categories):
        idx = np.flatnonzero(dice.labels == c)
        for start in range(0, len(idx), 200):
            items = [
                {"category": category, "data": b64_png(dice.images[i])}
                for i in idx[start : start + 200]
            ]
            client.post("/v1/datasets/evolve/images", json={"items": items}).raise_for_status()


# -- main ------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument(
        "--idle", type=int, default=50, help="jobs run one at a time for the idle latency"
    )
    ap.add_argument(
        "--count", type=int, default=20, help="jobs whose requests are counted per mode"
    )
    ap.add_argument("--broker", help="an existing RabbitMQ (amqp://...); default: a private node")
    ap.add_argument("--population", type=int, default=20)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per individual")
    ap.add_argument(
        "--rounds", type=int, default=2, help="evolve rounds (each: 1 then 2 processors)"
    )
    ap.add_argument("--skip-jobs", action="store_true")
    ap.add_argument("--skip-evolve", action="store_true")
    args = ap.parse_args()
    if not shutil.which("taskset") and not args.skip_evolve:
        raise SystemExit("taskset (util-linux) is needed to pin the processors")

    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start",
        flush=True,
    )
    with rabbitmq(args.broker) as (broker_url, broker_pgid):
        if not args.skip_jobs:
            results = {}
            for mode, url in (("embedded", None), ("rabbitmq", broker_url)):
                if url:
                    purge_dicebox_queues(url)
                results[mode] = r = bench_jobs(
                    args.jobs, args.idle, url, broker_pgid if url else None
                )
                print(
                    f"{mode}: {r['jobs']} one-epoch train jobs, 2 processors x 1 thread: {r['seconds']:.1f} s, "
                    f"{r['jobs_per_second']:.1f} jobs/s, {r['failed']} failed "
                    f"(submitting took {r['submit_seconds']:.1f} s)",
                    flush=True,
                )
                print(
                    f"{mode}: submit-to-running, idle processor: p50 {r['idle_p50_ms']:.1f} ms, "
                    f"p95 {r['idle_p95_ms']:.1f} ms (the submit's own round trip: p50 "
                    f"{r['submit_p50_ms']:.1f} ms)",
                    flush=True,
                )
                print(
                    f"{mode}: submit-to-running, {r['jobs']} queued at once: p50 {r['loaded_p50_ms']:.0f} ms, "
                    f"p95 {r['loaded_p95_ms']:.0f} ms",
                    flush=True,
                )
                cpu = r["cpu_ms_per_job"]
                print(
                    f"{mode}: CPU per job under the load: server {cpu['server']:.1f} ms, processors "
                    f"{cpu['processors']:.1f} ms, broker node {cpu['broker']:.1f} ms",
                    flush=True,
                )
            ratio = results["rabbitmq"]["jobs_per_second"] / results["embedded"]["jobs_per_second"]
            print(f"rabbitmq / embedded throughput: {ratio:.2f}x", flush=True)
            for mode, url in (("embedded", None), ("rabbitmq", broker_url)):
                if url:
                    purge_dicebox_queues(url)
                routes = count_requests(args.count, url)
                total = sum(routes.values())
                print(
                    f"{mode}: {total:.1f} HTTP requests per job: "
                    + ", ".join(f"{route} {n:.2f}" for route, n in routes.items()),
                    flush=True,
                )
        if not args.skip_evolve:
            # Alternating rounds (1, 2, 1, 2, ...): the machine's speed drifts, so each ratio
            # compares runs made close together.
            runs: dict[int, list[dict]] = {1: [], 2: []}
            for round_ in range(args.rounds):
                for n in (1, 2):
                    runs[n].append(
                        r := bench_evolve(
                            n, args.population, args.generations, args.epochs, broker_url
                        )
                    )
                    busy = r["training_seconds"] / n / r["seconds"]
                    print(
                        f"round {round_ + 1}, evolve on {n} pinned processor(s): {r['seconds']:.1f} s, "
                        f"{r['trained']} individuals trained ({r['training_seconds']:.1f} s of training, "
                        f"processors training {100 * busy:.0f}% of the time), best fitness "
                        f"{r['fitness']:.3f}, individuals per processor {r['per_worker']}",
                        flush=True,
                    )
                one, two = runs[1][-1], runs[2][-1]
                print(
                    f"round {round_ + 1}: speed-up {one['seconds'] / two['seconds']:.2f}x; training seconds "
                    f"2 vs 1 processor {two['training_seconds'] / one['training_seconds']:.2f}x "
                    f"(above 1: each core trained slower while both were busy)",
                    flush=True,
                )
            same = (
                len({json.dumps(r["genome"], sort_keys=True) for n in runs for r in runs[n]}) == 1
                and len({r["trained"] for n in runs for r in runs[n]}) == 1
            )
            median = {n: statistics.median(r["seconds"] for r in runs[n]) for n in runs}
            print(
                f"evolve speed-up with 2 processors (median of {args.rounds} round(s)): "
                f"{median[1] / median[2]:.2f}x ({median[1]:.1f} s -> {median[2]:.1f} s; the same winner and "
                f"individuals in every run: {same})",
                flush=True,
            )
    print(f"load average at the end: {os.getloadavg()[0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
