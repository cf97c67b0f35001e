"""Checks of a plan's memory and disk estimates against the machine, before any output is written.

A rank typed one digit too long passes every manifest check, and the merge then runs until the
kernel kills it for memory or the disk fills. Comparing the plan's own estimates with what the
machine has turns both into one message before anything is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lorakit.errors import LorakitError, OutputError
from lorakit.plan import Plan

__all__ = ["available_memory", "check_resources", "format_bytes", "free_disk_space"]


def format_bytes(count: float) -> str:
    """Format a byte count with binary units, such as ``162.0 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Return the kernel's MemAvailable in bytes, or None where /proc/meminfo does not exist (not Linux)."""
    try:
        lines = meminfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def free_disk_space(path: Path) -> int:
    """Return the bytes free to this user on the file system that contains ``path`` or its nearest existing parent."""
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def check_resources(plan: Plan) -> None:
    """Raise when the plan's estimated peak memory or output size exceeds what the machine has free.

    Raises:
        LorakitError: when the estimated peak host memory exceeds MemAvailable (exit 1, because the
            fix is usually a lower rank in the manifest).
        OutputError: when the output files would not fit on the output's file system (exit 2).
    """
    peak = plan.peak_memory_estimate()
    available = available_memory()
    if available is not None and peak > available:
        raise LorakitError(
            f"{plan.manifest.path}: the merge needs an estimated {format_bytes(peak)} of memory, but only "
            f"{format_bytes(available)} is available; lower the ranks in the manifest (lorakit plan shows "
            "each group's size), free memory, or pass --no-resource-check to run anyway"
        )

    # NOTE: the CUDA device memory estimate (Plan.device_memory_estimate) is not checked here.
    needed = plan.bytes_written
    free = free_disk_space(plan.manifest.output_path)
    if needed > free:
        raise OutputError(
            f"{plan.manifest.output_path}: the output needs {format_bytes(needed)} of disk space, but its file "
            f"system has {format_bytes(free)} free; free space, choose another output.path, or lower the ranks"
        )
