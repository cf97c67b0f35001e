"""Peak memory of a run stays near one batch, far below the size of the adapters.

A fresh Python process merges four synthetic adapters of 32 MiB each (130 MiB of input, 130 MiB
of output) in batches of 4 MiB and reports how much its peak resident set grew during
``run_plan``. Loading every input, or keeping every output until the end, would add at least
130 MiB. The bound is the plan's estimate (12 MiB here) plus a fixed 32 MiB for what the estimate
leaves out: thread stacks, the hashing buffer and allocator slack. The measured growth was
17 MiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.synthetic import ModelShape, make_adapters
from conftest import write_manifest

SHAPE = ModelShape("memory-test", layers=32, hidden=1024, intermediate=2048, kv_size=256)
BATCH_BYTES = 4 * 2**20
SLACK = 32 * 2**20

# ru_maxrss cannot measure this: Linux carries it over from the parent (pytest, over 1 GiB with
# transformers loaded) across fork and exec. Writing 5 to clear_refs resets VmHWM, the peak
# resident set of this address space, instead.
MEASURE = """
import json, sys
import torch
from lorakit.execute import run_plan
from lorakit.manifest import load_manifest
from lorakit.plan import build_plan

plan = build_plan(load_manifest(sys.argv[1]), device="cpu", batch_bytes=int(sys.argv[2]))
# Load the kernels the merge uses, so that their code pages count before the measurement.
x = torch.ones(64, 64)
torch.mul(x, 0.5, out=torch.empty(64, 64)).sum()
torch.gather(x, 1, torch.zeros(64, 4, dtype=torch.int64)).mul_(2.0)
def status(field):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(field + ":"))
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
before = status("VmRSS")
run_plan(plan, progress=False)
after = status("VmHWM")
print(json.dumps({"growth": after - before, "estimate": plan.peak_memory_estimate(),
                  "bytes_read": plan.bytes_read, "bytes_written": plan.bytes_written}))
"""


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> list[Path]:
    return make_adapters(tmp_path_factory.mktemp("memory"), SHAPE, count=4, rank=16, dtype=torch.float32)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak resident set")
@pytest.mark.parametrize("merge", [{"method": "block", "rank": 64}, {"method": "random", "rank": 64}], ids=["block", "random"])
def test_memory_peak_bounded_by_batch(tmp_path, adapters, merge):
    body = {
        "version": 1,
        "sources": [{"path": str(folder)} for folder in adapters],
        "merge": merge,
        "output": {"path": "../out"},
    }
    if merge["method"] == "random":
        body["seeds"] = [1]
    manifest = write_manifest(tmp_path / "recipe", body)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run(
        [sys.executable, "-c", MEASURE, str(manifest), str(BATCH_BYTES)],
        capture_output=True, text=True, env=environment, timeout=600, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)

    assert report["bytes_read"] > 120 * 2**20
    assert report["estimate"] < report["bytes_read"] / 4
    assert report["growth"] < report["estimate"] + SLACK, report
    assert report["growth"] < report["bytes_read"] / 2, report
