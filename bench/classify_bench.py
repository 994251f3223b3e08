"""Classification throughput: the dicebox server against a naive Flask + PyTorch server.

Both run as real processes on loopback ports with the same trained model (a small CNN, or an
MLP with ``--model mlp``, on 32 x 32 grey dice) and get the same load from ``wrk``:
``--connections`` concurrent clients (16), each sending one small PNG per request (JSON
``{"items": [{"data": base64}]}``, or multipart with ``--format multipart`` for dicebox),
back to back for ``--seconds``. The dicebox side is ``python -m dicebox serve`` (uvicorn, no
access log); the naive side is bench/naive_server.py (Flask's threaded development server,
as the original dicebox ran). Each run prints requests/s, p50/p95/p99 latency and the
server's CPU time per request; runs alternate between the two servers for ``--rounds``, and
the median round of each gives the ratio.

Needs ``wrk`` (Debian: ``apt-get install wrk``). It runs with one thread so that the servers
keep most of the machine.

    .venv/bin/python bench/classify_bench.py [--seconds 10] [--rounds 3] [--connections 16]
        [--model cnn|mlp] [--format json|multipart] [--naive-threads N] [--only dicebox|naive]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import free_port, multipart_body

HERE = Path(__file__).resolve().parent
SIZE = 32
CONV = {"type": "conv2d", "kernel": [3, 3], "padding": "same", "activation": "relu"}
GENOMES = {
    "cnn": {"optimizer": {"name": "adam", "learning_rate": 0.003},
            "layers": [dict(CONV, filters=8), {"type": "maxpool2d", "kernel": [2, 2]},
                       dict(CONV, filters=16), {"type": "maxpool2d", "kernel": [2, 2]},
                       {"type": "dense", "size": 64, "activation": "relu"}]},
    "mlp": {"optimizer": {"name": "adam", "learning_rate": 0.003},
            "layers": [{"type": "dense", "size": 128, "activation": "relu"},
                       {"type": "dense", "size": 64, "activation": "relu"}]},
}

# wrk script: every request is the same POST; at the end, one line with the counts and the
# latency percentiles (microseconds).
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = io.open(os.getenv("BENCH_BODY"), "rb"):read("*a")
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "duration_us": %d, "errors": %d, "non_2xx": %d, '
    .. '"p50": %d, "p95": %d, "p99": %d, "max": %d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
"""


def prepare(root: Path, kind: str) -> tuple[Path, Path, str, bytes]:
    """Trains the model and registers it in a fresh dicebox home. Returns (home, model
    directory, model id, one PNG of a die)."""
    from PIL import Image

    import dicebox
    from dicebox.db import make_engine, migrate
    from dicebox.registry import ModelRegistry
    from dicebox.settings import Settings

    dice = dicebox.datasets.make_dice(count=2000, size=SIZE, seed=0)
    train, val = dice.split([0.9, 0.1], seed=0)
    started = time.perf_counter()
    model = dicebox.train(GENOMES[kind], train, val=val, epochs=4, batch_size=64, seed=0)
    print(f"trained the {kind} in {time.perf_counter() - started:.1f} s, validation accuracy"
          f" {model.history[-1]['val_accuracy']:.3f}", flush=True)
    model_dir = model.save(root / "model")
    home = root / "home"
    home.mkdir()
    engine = make_engine(Settings(home=home).database_url)
    migrate(engine)
    record = ModelRegistry(engine, home / "models").register(None, model_dir, dataset="dice")
    engine.dispose()
    die = dicebox.datasets.make_dice(count=1, size=SIZE, seed=42).images[0, 0]
    out = io.BytesIO()
    Image.fromarray(die).save(out, "PNG")
    return home, model_dir, record["id"], out.getvalue()


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    """Starts a server and waits until its /healthz answers."""
    env = {k: v for k, v in os.environ.items() if k not in ("DICEBOX_API_KEY", "API_ACCESS_KEY")}
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{' '.join(cmd)} exited at start-up:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{' '.join(cmd)} did not start within 60 s:\n{log.read_text()}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def post(url: str, body: bytes, content_type: str) -> dict:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Side:
    """One server under test: its process and the request wrk sends it."""

    def __init__(self, name: str, proc: subprocess.Popen, url: str, body: Path,
                 content_type: str) -> None:
        self.name, self.proc, self.url, self.body, self.content_type = name, proc, url, body, \
            content_type
        self.runs: list[dict] = []

    def load(self, script: Path, seconds: int, connections: int) -> dict:
        env = dict(os.environ, BENCH_BODY=str(self.body), BENCH_CONTENT_TYPE=self.content_type)
        cpu = cpu_seconds(self.proc.pid)
        out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
                              "-s", str(script), self.url],
                             env=env, capture_output=True, text=True, check=False)
        cpu = cpu_seconds(self.proc.pid) - cpu
        if out.returncode != 0:
            raise SystemExit(f"wrk failed ({out.returncode}): {out.stdout}{out.stderr}")
        line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
        result = json.loads(line.removeprefix("RESULT "))
        result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
        result["cpu_us"] = cpu / max(result["requests"], 1) * 1e6
        result["loadavg"] = os.getloadavg()[0]
        return result


def describe(name: str, r: dict) -> str:
    failed = r["errors"] + r["non_2xx"]
    return (f"{name:<8}{r['rps']:8.0f} req/s   p50 {r['p50'] / 1000:6.2f} ms   p95 "
            f"{r['p95'] / 1000:6.2f} ms   p99 {r['p99'] / 1000:6.2f} ms   server CPU "
            f"{r['cpu_us']:5.0f} us/request   ({r['requests']} requests, {failed} failed,"
            f" load average {r['loadavg']:.1f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="length of each measured run")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured load before each run")
    parser.add_argument("--rounds", type=int, default=3, help="measured runs per server")
    parser.add_argument("--connections", type=int, default=16, help="concurrent clients")
    parser.add_argument("--model", choices=sorted(GENOMES), default="cnn")
    parser.add_argument("--format", choices=["json", "multipart"], default="json",
                        help="how dicebox gets the image (the naive server always takes JSON)")
    parser.add_argument("--naive-threads", type=int, default=None,
                        help="torch threads of the naive server (default: PyTorch's, one per core)")
    parser.add_argument("--only", choices=["dicebox", "naive"], help="measure one side only")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2

    root = Path(tempfile.mkdtemp(prefix="dicebox-classify-bench-"))
    sides: list[Side] = []
    try:
        home, model_dir, model_id, png = prepare(root, args.model)
        json_body = json.dumps({"items": [{"data": base64.b64encode(png).decode()}]}).encode()
        (root / "body.json").write_bytes(json_body)
        body, content_type = (json_body, "application/json") if args.format == "json" \
            else multipart_body([png])
        (root / "body.dicebox").write_bytes(body)
        script = root / "post.lua"
        script.write_text(WRK_SCRIPT)

        if args.only in (None, "dicebox"):
            port = free_port()
            proc = start([sys.executable, "-m", "dicebox", "serve", "--home", str(home),
                          "--port", str(port), "--log-level", "warning"],
                         port, root / "dicebox.log")
            url = f"http://127.0.0.1:{port}/v1/models/{model_id}/classify"
            sides.append(Side("dicebox", proc, url, root / "body.dicebox", content_type))
        if args.only in (None, "naive"):
            port = free_port()
            threads = [] if args.naive_threads is None else ["--threads", str(args.naive_threads)]
            proc = start([sys.executable, str(HERE / "naive_server.py"), "--model", str(model_dir),
                          "--port", str(port), *threads], port, root / "naive.log")
            sides.append(Side("naive", proc, f"http://127.0.0.1:{port}/classify",
                              root / "body.json", "application/json"))

        # Both answer the same (the naive side computes in PyTorch: equal up to rounding).
        answers = [post(s.url, s.body.read_bytes(), s.content_type)["predictions"][0]
                   for s in sides]
        for other in answers[1:]:
            assert other["category"] == answers[0]["category"], answers
            assert abs(other["probability"] - answers[0]["probability"]) < 1e-4, answers
        print(f"one {len(png)}-byte {SIZE}x{SIZE} grey PNG per request, {args.connections}"
              f" connections, {args.seconds} s runs, {os.cpu_count()} CPUs, dicebox body:"
              f" {args.format}, naive torch threads: {args.naive_threads or 'default'}", flush=True)

        for _ in range(args.rounds):
            for side in sides:
                if args.warmup > 0:
                    side.load(script, args.warmup, args.connections)
                side.runs.append(side.load(script, args.seconds, args.connections))
                print(describe(side.name, side.runs[-1]), flush=True)

        print("\nmedian round (by requests/s):")
        medians = {}
        for side in sides:
            medians[side.name] = sorted(side.runs, key=lambda r: r["rps"])[len(side.runs) // 2]
            print(describe(side.name, medians[side.name]))
        if len(medians) == 2:
            d, n = medians["dicebox"], medians["naive"]
            print(f"dicebox / naive: {d['rps'] / n['rps']:.2f}x requests/s, p99"
                  f" {d['p99'] / 1000:.1f} ms vs {n['p99'] / 1000:.1f} ms, CPU per request"
                  f" {n['cpu_us'] / d['cpu_us']:.2f}x less")
        if "dicebox" in medians:
            d = medians["dicebox"]
            met = d["rps"] >= 1000 and d["p99"] < 50_000
            print(f"target >= 1000 req/s with p99 < 50 ms: {'met' if met else 'NOT met'}")
        return 0
    finally:
        for side in sides:
            stop(side.proc)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
