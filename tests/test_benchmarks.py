"""Smoke test of the benchmark driver on toy shapes: every scenario runs and prints its table.

Speed and memory targets are measured by ``python -m benchmarks.run`` on real shapes and recorded
in docs/benchmarks.md, never asserted here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("/usr/bin/time") is None, reason="the memory scenario measures with /usr/bin/time")
def test_benchmark_driver_tiny(tmp_path):
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")])}
    command = [
        sys.executable, "-m", "benchmarks.run", "--size", "tiny", "--repeat", "1", "--methods", "block",
        "--scenario", "speed", "memory", "device", "--device", "cpu", "--memory-repeat", "1",
        "--workdir", str(tmp_path / "work"), "--json", str(tmp_path / "rows.json"), "--clean",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPOSITORY, timeout=600, check=False)

    assert completed.returncode == 0, completed.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [row["scenario"] for row in rows] == ["speed", "memory", "device"]
    for row in rows:
        assert row["machine"] in completed.stdout
        assert row["date"] in completed.stdout
        assert f"`{row['command']}`" in completed.stdout
    assert rows[0]["figures"]["ratio"] > 0
    assert rows[1]["figures"]["peak_rss_bytes"] > rows[1]["figures"]["estimate_bytes"]
    assert rows[2]["figures"]["traffic_bytes"] >= rows[2]["figures"]["staged_bytes"] > 0
    assert not (tmp_path / "work").exists()
