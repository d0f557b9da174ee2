"""Smoke test of the benchmarks: make_db and interactions run end to end on tiny shapes (no timings
asserted; the benchmarks only print figures)."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_make_db_and_interactions_quick(tmp_path):
    db = str(tmp_path / "db")
    shape = ["--layers", "2", "--heads", "2", "--hidden", "16"]
    out = subprocess.run([sys.executable, "bench/make_db.py", db, "-n", "3", "--text", "6", "--grid", "3", "4",
                          "--image", "48", "--fast-tsne", "--quick", *shape],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "examples/s" in out.stdout and "MB/example" in out.stdout

    out = subprocess.run([sys.executable, "bench/interactions.py", "--db", db, "--quick", "--reps", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("page load (replay)", "select another example", "click a text token", "click a head",
                 "hover a t-SNE point", "open the attention matrix"):
        assert name in out.stdout, out.stdout
    assert "ERRORS" not in out.stdout, out.stdout
