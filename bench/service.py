"""Service benchmark: job throughput and latency through the embedded queue, and
classification against the naive per-request Flask + PyTorch server.

Jobs: a real server (``dicebox serve``) with 2 processors (one thread each) on a loopback
port; N one-epoch train jobs on a small dice dataset, submitted at once; jobs/s from the
first submission to the last completion. Submit-to-running latency is measured on an idle
processor (one job at a time: ``started_at - created_at``, both stamped by the server's
clock) and under the 500-job load (which includes queueing). The peer for throughput is the
same work with no service at all (split, train, evaluate, save, in two processes), so the
ratio is the share of the machine the service leaves to training.

Classification: bench/classify_bench.py (16 concurrent clients against both servers).

    .venv/bin/python bench/service.py [--jobs 500] [--idle 50] [--skip-classify]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Processor, Server, all_jobs, percentile, upload_dice, wait_for

GENOME = {"optimizer": {"name": "adam", "learning_rate": 0.002},
          "layers": [{"type": "dense", "size": 32, "activation": "relu"}]}


def _seconds(job: dict, start: str, end: str) -> float:
    return (datetime.fromisoformat(job[end]) - datetime.fromisoformat(job[start])).total_seconds()


def bench_jobs(n_jobs: int, n_idle: int) -> dict:
    with tempfile.TemporaryDirectory() as home:
        server = Server(Path(home))
        processors = [Processor(server, f"bench{i}", threads=1) for i in range(2)]
        client = server.client()
        try:
            upload_dice(client, "bench", 600, multipart=False)
            body = {"kind": "train", "dataset": "bench", "genome": GENOME,
                    "params": {"epochs": 1, "validation": 0.1, "test": 0.1}}
            # Warm-up: both processors have fetched and cached the dataset export.
            warm = [client.post("/v1/jobs", json=body).json()["id"] for _ in range(4)]
            wait_for(lambda: all(client.get(f"/v1/jobs/{j}").json()["status"] == "succeeded" for j in warm),
                     120, 0.1, "warm-up jobs")

            idle = []
            def finished(job_id: str) -> dict | None:
                job = client.get(f"/v1/jobs/{job_id}").json()
                return job if job["status"] == "succeeded" else None

            for _ in range(n_idle):
                job_id = client.post("/v1/jobs", json=body).json()["id"]
                job = wait_for(lambda job_id=job_id: finished(job_id), 60, 0.005, "an idle-latency job")
                idle.append(_seconds(job, "created_at", "started_at"))

            started = time.perf_counter()
            ids = [client.post("/v1/jobs", json=body).json()["id"] for _ in range(n_jobs)]
            submitted = time.perf_counter() - started
            wanted = set(ids)

            def all_done() -> bool:
                queued = client.get("/v1/jobs", params={"status": "queued", "limit": 1}).json()["items"]
                running = client.get("/v1/jobs", params={"status": "running", "limit": 1}).json()["items"]
                return not queued and not running

            wait_for(all_done, 3600, 0.5, "the benchmark jobs")
            elapsed = time.perf_counter() - started
            jobs = [j for j in all_jobs(client) if j["id"] in wanted]
            failed = [j for j in jobs if j["status"] != "succeeded"]
            loaded = [_seconds(j, "created_at", "started_at") for j in jobs]
            return {
                "jobs": n_jobs, "failed": len(failed), "seconds": elapsed, "jobs_per_second": n_jobs / elapsed,
                "submit_seconds": submitted,
                "idle_p50_ms": 1000 * statistics.median(idle), "idle_p95_ms": 1000 * percentile(idle, 0.95),
                "loaded_p50_ms": 1000 * statistics.median(loaded), "loaded_p95_ms": 1000 * percentile(loaded, 0.95),
            }
        finally:
            client.close()
            for p in processors:
                p.stop()
            server.stop()


PEER_SCRIPT = """
import sys, tempfile, time, dicebox
n, genome = int(sys.argv[1]), __import__("json").loads(sys.argv[2])
dice = dicebox.datasets.make_dice(count=600, size=24, seed=0)
with tempfile.TemporaryDirectory() as out:
    for i in range(n):
        train, val, test = dice.split([0.8, 0.1, 0.1], seed=0)
        model = dicebox.train(genome, train, val=val, epochs=1, threads=1)
        model.evaluate(test)
        model.save(f"{out}/{i}")
"""


def bench_ceiling(n_jobs: int) -> float:
    """Jobs/s of the same work with no service at all: two processes (one thread each) each
    running half the jobs back to back in-process (split, train, evaluate, save)."""
    import json
    import subprocess

    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", PEER_SCRIPT, str(n_jobs // 2), json.dumps(GENOME)])
             for _ in range(2)]
    for proc in procs:
        if proc.wait() != 0:
            raise RuntimeError("the in-process peer failed")
    return (n_jobs // 2 * 2) / (time.perf_counter() - started)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--idle", type=int, default=50, help="jobs run one at a time for the idle latency")
    ap.add_argument("--skip-classify", action="store_true")
    ap.add_argument("--seconds", type=float, default=20.0, help="classification load duration per server")
    args = ap.parse_args()

    r = bench_jobs(args.jobs, args.idle)
    ceiling = bench_ceiling(args.jobs)
    print(f"jobs: {r['jobs']} one-epoch train jobs, 2 processors x 1 thread: {r['seconds']:.1f} s, "
          f"{r['jobs_per_second']:.1f} jobs/s, {r['failed']} failed (submitting took {r['submit_seconds']:.1f} s)")
    print(f"the same work in-process, no service (2 processes x 1 thread): {ceiling:.1f} jobs/s; "
          f"the service delivers {r['jobs_per_second'] / ceiling:.2f}x of it")
    print(f"submit-to-running, idle processor: p50 {r['idle_p50_ms']:.1f} ms, p95 {r['idle_p95_ms']:.1f} ms")
    print(f"submit-to-running, {r['jobs']} queued at once: p50 {r['loaded_p50_ms']:.0f} ms, "
          f"p95 {r['loaded_p95_ms']:.0f} ms (includes waiting in the queue)")
    if not args.skip_classify:
        import classify_bench  # bench/classify_bench.py

        return classify_bench.main(["--seconds", str(args.seconds)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
