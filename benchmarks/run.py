"""Benchmark driver: generate synthetic adapters, run ``lorakit run`` against the I/O floor, print tables.

Scenarios:

- ``speed``: block, random, soups and cat on 4 rank-16 Llama-2-7B-shaped adapters (float32
  safetensors, K = 64), ``lorakit run --device cpu`` against ``benchmarks.floor``. The two run
  interleaved, alternating which goes first, and the table gives medians.
- ``memory``: 8 rank-32 Llama-3-70B-shaped adapters (bfloat16 safetensors) block-merged to
  K = 256. Peak resident memory of the whole ``lorakit run`` process from ``/usr/bin/time``.
- ``device``: ``speed`` with ``--device cuda`` (or ``--device``), plus one in-process run whose
  per-group timings give the achieved device memory traffic, against the card's measured
  device-to-device copy bandwidth.

``--size tiny`` swaps every shape for a 4-layer toy model, so that a run takes seconds (CI uses
it as a smoke test). Every lorakit and floor run is a fresh Python process with torch imported.

Usage::

    python -m benchmarks.run --scenario speed memory --workdir /tmp/lorakit-bench
    python -m benchmarks.run --scenario device --device cuda --workdir /tmp/lorakit-bench
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.synthetic import SHAPES, ModelShape, make_adapters
from lorakit.hashcache import CACHE_ENV

__all__ = ["Row", "machine_description", "main"]

REPOSITORY = Path(__file__).resolve().parents[1]
SPEED_METHODS = {
    "block": {"method": "block", "rank": 64},
    "random": {"method": "random", "rank": 64},
    "soups": {"method": "soups"},
    "cat": {"method": "cat"},
}


@dataclass
class Row:
    """One result row: what ran, on which machine and when, and what it measured."""

    scenario: str
    case: str
    command: str
    machine: str
    date: str
    load_before: float
    figures: dict[str, Any] = field(default_factory=dict)


def machine_description(device: str) -> str:
    """Return 'N cores (model), X GiB RAM, device' for this machine."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"{os.cpu_count()} cores ({model}), {memory:.1f} GiB RAM, {device}"


def _environment(cache: Path | None = None) -> dict[str, str]:
    """Return the environment of a run: this checkout first on the path and, if given, its own hash cache folder."""
    path = os.environ.get("PYTHONPATH", "")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPOSITORY), path]))}
    if cache is not None:
        environment[CACHE_ENV] = str(cache)
    return environment


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(command: list[str], cache: Path | None = None) -> tuple[float, float]:
    """Run ``command`` and return its wall time and CPU time (user + system, every thread) in seconds."""
    cpu = _children_cpu()
    began = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=_environment(cache), check=False)
    elapsed = time.perf_counter() - began
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {completed.returncode}:\n{completed.stderr}")
    return elapsed, _children_cpu() - cpu


def _evict(paths: list[Path]) -> None:
    """Drop ``paths`` from the page cache, so that the next run reads them from the disk.

    Only these files are evicted (``posix_fadvise`` with ``POSIX_FADV_DONTNEED``), so other
    processes' cached data stays.
    """
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _adapters(workdir: Path, shape: ModelShape, count: int, rank: int, dtype: torch.dtype) -> list[Path]:
    """Return the adapter folders, generating them unless a previous run left them complete."""
    root = workdir / f"{shape.name}-{count}x-r{rank}-{str(dtype).removeprefix('torch.')}"
    folders = [root / f"adapter-{index}" for index in range(count)]
    if all((folder / "adapter_config.json").is_file() for folder in folders):
        return folders
    _remove(root)
    began = time.perf_counter()
    make_adapters(root, shape, count, rank, dtype)
    size = sum((folder / "adapter_model.safetensors").stat().st_size for folder in folders)
    print(f"generated {count} adapters, {size / 2**30:.2f} GiB, in {time.perf_counter() - began:.1f} s: {root}", file=sys.stderr)
    return folders


def _manifest(workdir: Path, name: str, sources: list[Path], merge: dict[str, Any]) -> Path:
    body: dict[str, Any] = {
        "version": 1,
        "name": name,
        "sources": [{"path": str(folder)} for folder in sources],
        "merge": merge,
        "output": {"path": f"../out/{name}"},
    }
    if merge["method"] == "random":
        body["seeds"] = [1]
    path = workdir / "manifests" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


def _plan(manifest: Path, device: str) -> dict[str, Any]:
    """Return ``lorakit plan --json`` of ``manifest``, computed in this process."""
    from lorakit.manifest import load_manifest
    from lorakit.plan import build_plan

    plan = build_plan(load_manifest(manifest), device=device)
    for adapter in plan.adapters:
        adapter.close()
    return plan.to_dict()


def _today() -> str:
    return datetime.date.today().isoformat()


def scenario_speed(
    workdir: Path, tiny: bool, repeat: int, device: str, methods: list[str], cold: bool, scenario: str = "speed"
) -> list[Row]:
    """Time ``lorakit run`` against the floor for each of ``methods``, interleaved.

    With ``cold``, the input files are evicted from the page cache before every run.
    """
    shape = SHAPES["tiny" if tiny else "llama2-7b"]
    sources = _adapters(workdir, shape, count=4, rank=16, dtype=torch.float32)
    input_paths = [folder / "adapter_model.safetensors" for folder in sources]
    inputs = [str(path) for path in input_paths]
    evicted = input_paths if cold else []
    machine = machine_description(device)
    rows = []
    for name in methods:
        merge = SPEED_METHODS[name]
        case = f"{name}-{device.replace(':', '')}{'-cold' if cold else ''}"
        manifest = _manifest(workdir, case, sources, merge)
        plan = _plan(manifest, device)
        output = workdir / "out" / case
        floor_output = workdir / "out" / f"{case}.floor"
        lorakit_command = [sys.executable, "-m", "lorakit.cli", "run", str(manifest), "--device", device, "--no-progress"]
        floor_command = [sys.executable, "-m", "benchmarks.floor", str(floor_output), str(plan["bytes_written"]), *inputs]

        load = os.getloadavg()[0]
        # One run with an empty hash cache first: it hashes every source, as a first run on new adapters does.
        _remove(output)
        cold_cache = workdir / "hash-cache-cold"
        _remove(cold_cache)
        _evict(evicted)
        first = _timed(lorakit_command, cache=cold_cache)
        _remove(cold_cache)

        times: dict[str, list[tuple[float, float]]] = {"floor": [], "lorakit": []}
        for index in range(repeat):
            order = ("floor", "lorakit") if index % 2 == 0 else ("lorakit", "floor")
            for runner in order:
                _remove(output)
                _remove(floor_output)
                _evict(evicted)
                times[runner].append(_timed(floor_command if runner == "floor" else lorakit_command))
        _remove(floor_output)
        _remove(output)

        floor = statistics.median(wall for wall, _ in times["floor"])
        merged = statistics.median(wall for wall, _ in times["lorakit"])
        floor_cpu = statistics.median(cpu for _, cpu in times["floor"])
        merged_cpu = statistics.median(cpu for _, cpu in times["lorakit"])
        rows.append(
            Row(
                scenario=scenario,
                case=f"{name}, {'cold' if cold else 'warm'} page cache",
                command=f"lorakit run {manifest.name} --device {device}",
                machine=machine,
                date=_today(),
                load_before=load,
                figures={
                    "bytes_read": plan["bytes_read"],
                    "bytes_written": plan["bytes_written"],
                    "floor_s": [round(wall, 3) for wall, _ in times["floor"]],
                    "lorakit_s": [round(wall, 3) for wall, _ in times["lorakit"]],
                    "floor_cpu_s": [round(cpu, 3) for _, cpu in times["floor"]],
                    "lorakit_cpu_s": [round(cpu, 3) for _, cpu in times["lorakit"]],
                    "floor_median_s": round(floor, 3),
                    "lorakit_median_s": round(merged, 3),
                    "ratio": round(merged / floor, 3),
                    "cpu_ratio": round(merged_cpu / floor_cpu, 3),
                    "cold_cache_s": round(first[0], 3),
                    "cold_cache_ratio": round(first[0] / floor, 3),
                    "load_after": os.getloadavg()[0],
                },
            )
        )
    return rows


def _max_rss(command: list[str]) -> tuple[int, float]:
    """Run ``command`` under ``/usr/bin/time`` and return its peak resident set (bytes) and wall time.

    ``/usr/bin/time`` forks the command from a small process. Measuring with ``os.wait4`` from
    this driver instead would report at least the driver's own peak, because Linux carries
    ``ru_maxrss`` over across fork and exec.
    """
    report = Path(os.environ.get("TMPDIR", "/tmp")) / f"lorakit-bench-time-{os.getpid()}.txt"
    began = time.perf_counter()
    completed = subprocess.run(
        ["/usr/bin/time", "-f", "%M", "-o", str(report), *command], capture_output=True, text=True, env=_environment(), check=False
    )
    elapsed = time.perf_counter() - began
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {completed.returncode}:\n{completed.stderr}")
    kib = int(report.read_text().split()[-1])
    report.unlink()
    return kib * 1024, elapsed


def scenario_memory(workdir: Path, tiny: bool, repeat: int) -> list[Row]:
    """Measure the peak resident memory of a 70B-shaped block merge, and its time against the floor.

    Dirty pages of the generated adapters are flushed first. Then lorakit and the floor run
    interleaved, ``repeat`` times each, because the page cache state left by one run slows the
    next.
    """
    shape = SHAPES["tiny" if tiny else "llama3-70b"]
    sources = _adapters(workdir, shape, count=8, rank=32, dtype=torch.bfloat16)
    manifest = _manifest(workdir, "block256-70b", sources, {"method": "block", "rank": 256})
    plan = _plan(manifest, "cpu")
    output = workdir / "out" / "block256-70b"
    floor_output = workdir / "out" / "block256-70b.floor"
    lorakit_command = [sys.executable, "-m", "lorakit.cli", "run", str(manifest), "--device", "cpu", "--no-progress"]
    floor_command = [sys.executable, "-m", "benchmarks.floor", str(floor_output), str(plan["bytes_written"])]
    floor_command += [str(folder / "adapter_model.safetensors") for folder in sources]
    os.sync()
    load = os.getloadavg()[0]

    peaks, walls, floors = [], [], []
    for index in range(repeat):
        order = ("lorakit", "floor") if index % 2 == 0 else ("floor", "lorakit")
        for runner in order:
            _remove(output)
            _remove(floor_output)
            if runner == "floor":
                floors.append(_timed(floor_command)[0])
            else:
                peak, elapsed = _max_rss(lorakit_command)
                peaks.append(peak)
                walls.append(elapsed)
    _remove(output)
    _remove(floor_output)
    baseline, _ = _max_rss([sys.executable, "-c", "import torch, lorakit.cli"])

    return [
        Row(
            scenario="memory",
            case="block K=256, 8 x r32 bf16",
            command=f"/usr/bin/time -f %M lorakit run {manifest.name} --device cpu",
            machine=machine_description("cpu"),
            date=_today(),
            load_before=load,
            figures={
                "bytes_read": plan["bytes_read"],
                "bytes_written": plan["bytes_written"],
                "peak_rss_bytes": max(peaks),
                "peak_rss_runs": peaks,
                "import_rss_bytes": baseline,
                "estimate_bytes": plan["peak_memory_estimate"],
                "lorakit_s": [round(wall, 3) for wall in walls],
                "floor_s": [round(wall, 3) for wall in floors],
                "lorakit_median_s": round(statistics.median(walls), 3),
                "floor_median_s": round(statistics.median(floors), 3),
                "ratio": round(statistics.median(walls) / statistics.median(floors), 3),
                "load_after": os.getloadavg()[0],
            },
        )
    ]


def copy_bandwidth(device: torch.device, size: int = 2**30) -> float:
    """Return the device's measured copy bandwidth in bytes/s: (read + write) bytes over time."""
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    rounds = 10
    for _ in range(rounds):
        target.copy_(source)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size * rounds / (time.perf_counter() - began)


def nominal_bandwidth(device: torch.device) -> float | None:
    """Return the nominal memory bandwidth in bytes/s from the clock and bus width, when torch reports them."""
    if device.type != "cuda":
        return None
    properties = torch.cuda.get_device_properties(device)
    clock_khz = getattr(properties, "memory_clock_rate", None)
    bus_bits = getattr(properties, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    # Double data rate: two transfers per clock.
    return 2 * clock_khz * 1e3 * bus_bits / 8


def device_traffic(manifest: Path, device: str) -> dict[str, Any]:
    """Run ``manifest`` once in this process and estimate its device memory traffic from the group timings.

    The estimate is a lower bound on the bytes the device's memory moves. The host-to-device
    copy writes every staged input byte once, and every input is read once in float32. Every
    result is written once in float32 and read once for the cast and the copy back.
    """
    from lorakit.execute import GroupTiming, run_plan
    from lorakit.manifest import load_manifest
    from lorakit.plan import build_plan

    plan = build_plan(load_manifest(manifest), device=device)
    output = plan.manifest.output_path
    _remove(output)
    timings: list[GroupTiming] = []
    run_plan(plan, progress=False, timings=timings)
    _remove(output)

    staged = sum(timing.bytes_staged for timing in timings)
    returned = sum(timing.bytes_returned for timing in timings)
    float32_in = sum(group.float32_input_bytes(len(group.module_paths)) for group in plan.groups)
    float32_out = 4 * returned // plan.output_dtype.itemsize
    traffic = staged + float32_in + float32_out + returned
    transfer_s = sum(timing.to_device_s + timing.to_host_s for timing in timings)
    device_s = transfer_s + sum(timing.merge_s for timing in timings)
    measured = copy_bandwidth(plan.device)
    nominal = nominal_bandwidth(plan.device)
    return {
        "staged_bytes": staged,
        "returned_bytes": returned,
        "traffic_bytes": traffic,
        "device_s": round(device_s, 4),
        "traffic_per_s": traffic / device_s,
        "transfer_per_s": (staged + returned) / transfer_s,
        "copy_bandwidth_per_s": measured,
        "nominal_bandwidth_per_s": nominal,
        "share_of_copy_bandwidth": round(traffic / device_s / measured, 4),
    }


def scenario_device(workdir: Path, tiny: bool, repeat: int, device: str, methods: list[str], cold: bool) -> list[Row]:
    """Run ``speed`` on ``device`` and add the device memory traffic of one in-process block run."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return [
            Row(
                scenario="device",
                case="skipped",
                command=f"python -m benchmarks.run --scenario device --device {device}",
                machine=machine_description("cpu"),
                date=_today(),
                load_before=os.getloadavg()[0],
                figures={"note": "no CUDA device on this machine"},
            )
        ]
    rows = scenario_speed(workdir, tiny, repeat, device, methods, cold, scenario="device")
    for row, method in zip(rows, methods):
        manifest = workdir / "manifests" / f"{method}-{device.replace(':', '')}{'-cold' if cold else ''}.yaml"
        row.figures.update(device_traffic(manifest, device))
    return rows


def _gb(count: float | None) -> str:
    return "n/a" if count is None else f"{count / 1e9:.1f}"


def format_table(rows: list[Row]) -> str:
    """Return the rows as Markdown tables, one per scenario."""
    lines = []
    for scenario in dict.fromkeys(row.scenario for row in rows):
        chosen = [row for row in rows if row.scenario == scenario]
        if chosen[0].case == "skipped":
            row = chosen[0]
            lines += [f"{scenario}: skipped, {row.figures['note']} ({row.machine}, {row.date})", ""]
            continue
        if scenario == "memory":
            lines += [
                "| case | read GB | written GB | peak RSS MiB (max of runs) | import-only RSS MiB | plan estimate MiB | lorakit s (median) | floor s (median) | ratio | runs | load before/after | command | machine | date |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for row in chosen:
                f = row.figures
                lines.append(
                    f"| {row.case} | {_gb(f['bytes_read'])} | {_gb(f['bytes_written'])} | {f['peak_rss_bytes'] / 2**20:.0f} "
                    f"| {f['import_rss_bytes'] / 2**20:.0f} | {f['estimate_bytes'] / 2**20:.0f} | {f['lorakit_median_s']:.1f} "
                    f"| {f['floor_median_s']:.1f} | {f['ratio']:.2f} | {len(f['lorakit_s'])} | {row.load_before:.1f}/{f['load_after']:.1f} "
                    f"| `{row.command}` | {row.machine} | {row.date} |"
                )
        else:
            extra = " device GB/s | share of copy bandwidth | transfer GB/s |" if scenario == "device" else ""
            lines += [
                f"| method | read MB | floor s (median) | lorakit s (median) | ratio | CPU-time ratio | first run, empty hash cache: s (ratio) | runs |{extra} load before/after | command | machine | date |",
                "|---|---|---|---|---|---|---|---|" + ("---|---|---|" if extra else "") + "---|---|---|---|",
            ]
            for row in chosen:
                f = row.figures
                device_cells = ""
                if extra:
                    device_cells = (
                        f" {_gb(f['traffic_per_s'])} | {f['share_of_copy_bandwidth']:.1%} of {_gb(f['copy_bandwidth_per_s'])} "
                        f"| {_gb(f['transfer_per_s'])} |"
                    )
                lines.append(
                    f"| {row.case} | {f['bytes_read'] / 1e6:.0f} | {f['floor_median_s']:.2f} | {f['lorakit_median_s']:.2f} "
                    f"| {f['ratio']:.2f} | {f['cpu_ratio']:.2f} | {f['cold_cache_s']:.2f} ({f['cold_cache_ratio']:.2f}) "
                    f"| {len(f['lorakit_s'])} |{device_cells} {row.load_before:.1f}/{f['load_after']:.1f} "
                    f"| `{row.command}` | {row.machine} | {row.date} |"
                )
        lines.append("")
    return "\n".join(lines)


def main(arguments: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", nargs="+", choices=["speed", "memory", "device"], default=["speed", "memory"])
    parser.add_argument("--size", choices=["full", "tiny"], default="full", help="full model shapes, or a 4-layer toy (default full).")
    parser.add_argument("--repeat", type=int, default=5, help="Runs of lorakit and of the floor per method (default 5).")
    parser.add_argument("--memory-repeat", type=int, default=2, help="Runs of lorakit and of the floor in the memory scenario (default 2).")
    parser.add_argument("--device", default="cuda", help="Device of the device scenario (default cuda).")
    parser.add_argument(
        "--methods", nargs="+", choices=list(SPEED_METHODS), default=list(SPEED_METHODS),
        help="Methods of the speed and device scenarios (default all four).",
    )
    parser.add_argument("--cold", action="store_true", help="Evict the inputs from the page cache before every run of the speed and device scenarios.")
    parser.add_argument("--workdir", type=Path, required=True, help="Folder for adapters and outputs; reused between runs.")
    parser.add_argument("--json", type=Path, help="Also write every row, with each run's time, to this file.")
    parser.add_argument("--clean", action="store_true", help="Delete the work folder at the end.")
    options = parser.parse_args(arguments)

    workdir = options.workdir.resolve()
    (workdir / "out").mkdir(parents=True, exist_ok=True)
    # Every run below, in this process or a child, keeps its source hash cache in the work folder.
    os.environ[CACHE_ENV] = str(workdir / "hash-cache")
    tiny = options.size == "tiny"
    rows: list[Row] = []
    try:
        if "speed" in options.scenario:
            rows += scenario_speed(workdir, tiny, options.repeat, "cpu", options.methods, options.cold)
        if "memory" in options.scenario:
            rows += scenario_memory(workdir, tiny, options.memory_repeat)
        if "device" in options.scenario:
            rows += scenario_device(workdir, tiny, options.repeat, options.device, options.methods, options.cold)
    finally:
        if options.clean:
            shutil.rmtree(workdir, ignore_errors=True)

    print(format_table(rows))
    if options.json:
        options.json.write_text(json.dumps([asdict(row) for row in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
