"""A short run of the soak benchmark (bench/soak.py): mixed load against a real server with two
processors must leave no unexpected error, no lost or badly ended job, and a dataset holding
exactly what the uploads acknowledged. Memory growth and timings are not asserted here: they
need the long run, and this machine is shared."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[1] / "bench" / "soak.py"


def test_short_soak_loses_nothing(tmp_path):
    out = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, str(SOAK), "--duration", "45", "--warmup", "15", "--sample-every", "2",
         "--evolve-every", "30", "--drain-timeout", "45", "--home", str(tmp_path / "home"),
         "--json", str(out)],
        capture_output=True, text=True, timeout=150, check=False)
    assert out.exists(), f"no result (exit {run.returncode}):\n{run.stdout}\n{run.stderr}"
    result = json.loads(out.read_text())
    verdict = result["verdict"]
    context = f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    assert verdict["unexpected_errors"] == 0, context
    assert verdict["lost_jobs"] == 0, context
    assert verdict["bad_jobs"] == 0, context
    assert verdict["dataset_count_ok"], context

    # The load really was mixed: every kind of request happened and was answered as expected.
    requests = result["requests"]
    for kind in ("classify", "upload_json", "upload_multipart", "submit_train", "submit_evolve",
                 "cancel", "job_show", "jobs_list", "events", "metrics", "dataset_show",
                 "models_list"):
        assert requests.get(kind, {}).get("ok", 0) > 0, (kind, requests)
    for kind in ("bad_classify", "bad_upload", "bad_submit"):
        assert requests.get(kind, {}).get("expected_4xx", 0) > 0, (kind, requests)
    jobs = result["jobs"]
    assert jobs["statuses"].get("train succeeded", 0) > 0, jobs
    assert jobs["statuses"].get("evolve succeeded", 0) > 0, jobs
    assert jobs["evolve_children"] > 0, jobs
    # Memory was sampled for the server and both processors (the figures are not judged).
    assert {"server", "processor local0", "processor local1"} <= set(result["memory"]), \
        result["memory"].keys()
