"""The benchmark must keep running: ``bench/run.py --smoke --reps 1`` end to end.

Tiny sizes, every workload and variant, real gunicorn servers on 127.0.0.1 (a few
seconds). It checks that the script exits 0 and prints the results table with every
workload, not the numbers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration

WORKLOAD_ROWS = ("| w1 ", "| w2 ", "| w3 ", "| w4 peak RSS", "| w5 Create+Close", "| cost: w2")


def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.md"
    cmd = [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--reps", "1",
           "--tmp", str(tmp_path), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.terminate()  # run.py stops its servers on SIGTERM
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"bench/run.py --smoke took too long:\n{stderr[-4000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    assert "| workload | unit | A | B | B/A | B-fsync | B-fsync/A |" in stdout
    assert "| A-direct | A-direct/A | B/A-direct |" in stdout
    for row in WORKLOAD_ROWS:
        assert row in stdout, f"no {row.strip()!r} row in:\n{stdout}"
    assert "CPU: " in stdout and "Temp dir: " in stdout
    assert out.read_text() in stdout
    # Everything it created under the temp dir is gone again.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("flask-bits-bench-")]
