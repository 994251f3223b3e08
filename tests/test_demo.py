"""``dicebox demo`` runs the whole service end to end by itself and exits 0 (the same code
as ``make demo``): server, two processors, an evolve job, the leaderboard, test accuracy and
the classification of new dice."""

from __future__ import annotations

import os
import re
import subprocess
import sys


def test_demo_runs_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICEBOX_")}
    env["HOME"] = str(tmp_path)  # nothing configured, nothing in ~/.dicebox
    done = subprocess.run([sys.executable, "-m", "dicebox", "demo"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=900, check=False)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert re.search(r"server with 2 processors at http://127\.0\.0\.1:\d+", out)
    assert "dataset 'dice': 2400 images" in out
    assert len(re.findall(r"generation \d individual +\d+: validation accuracy", out)) == 32
    assert "leaderboard:" in out and "best network:" in out
    accuracy = float(re.search(r"its test accuracy: ([0-9.]+)", out).group(1))
    assert accuracy > 1 / 6 + 0.2, out  # far above chance on six faces
    assert len(re.findall(r"\d->\d \(", out)) == 8
    assert not (tmp_path / ".dicebox").exists()
