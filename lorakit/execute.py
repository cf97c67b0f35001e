"""Executing a plan: read each group's factors, merge them batched on the device, stream the output.

Memory stays bounded by one batch of one group. Each batch's factors are read with ``pread``
straight into one reused staging buffer, stacked per source and factor, moved to the device in
one copy, merged by one call of the method over all its layers, cast, moved back in one copy and
written at their planned offsets in the output file before the next batch is read.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lorakit.adapter import Adapter
from lorakit.errors import OutputError
from lorakit.hashcache import HashCache
from lorakit.methods import GroupInput, get_method
from lorakit.peft_config import build_adapter_config, output_alpha
from lorakit.batches import Buffers, check_finite, read_batch, synchronize, to_device, to_host
from lorakit.plan import ModuleGroup, Plan
from lorakit.provenance import PROVENANCE_NAME, file_sha256, git_state, package_versions
from lorakit.writer import OutputFolder, SafetensorsWriter

__all__ = ["GroupTiming", "RunResult", "run_plan"]

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


@dataclass(frozen=True)
class RunResult:
    """One written output folder."""

    seed: int | None
    path: Path
    files: dict[str, str]


def _output_keys(plan: Plan, group: ModuleGroup, index: int) -> tuple[str, str]:
    """Return the output tensor names of one module: the first source's key names."""
    module = plan.adapters[0].modules[group.module_paths[index]]
    return module.a_key, module.b_key


def _tensor_specs(plan: Plan) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    specs = []
    for group in plan.groups:
        a_shape, b_shape = group.output_shapes()
        for index in range(len(group.module_paths)):
            a_key, b_key = _output_keys(plan, group, index)
            specs.append((a_key, a_shape, plan.output_dtype))
            specs.append((b_key, b_shape, plan.output_dtype))
    return specs


@dataclass
class GroupTiming:
    """Where one group's time went, in seconds, and the bytes it moved.

    ``bytes_read`` counts the stored input bytes, ``bytes_staged`` the same bytes in the staging
    buffer (each factor's slot aligned, so slightly more), ``bytes_returned`` the merged factors
    copied back to the host (once per seed for methods that draw), and ``bytes_written`` the
    tensor bytes written over every output file. On the CPU ``to_device_s`` covers the float32
    conversion and the finite check, and ``to_host_s`` only the cast to the output dtype.
    ``write_s`` is spent in the writer thread, while the next batch is read and merged.
    """

    projection: str
    method: str
    modules: int
    batches: int
    bytes_read: int
    bytes_staged: int = 0
    bytes_returned: int = 0
    bytes_written: int = 0
    read_s: float = 0.0
    to_device_s: float = 0.0
    merge_s: float = 0.0
    to_host_s: float = 0.0
    write_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.read_s + self.to_device_s + self.merge_s + self.to_host_s + self.write_s


def _log_timing(timing: GroupTiming) -> None:
    mib = 2**20
    logger.info(
        "%s (%s): %d modules in %d batch(es), %.3f s: read %.1f MiB in %.3f s, to device %.3f s, merge %.3f s, "
        "to host %.3f s, wrote %.1f MiB in %.3f s",
        timing.projection, timing.method, timing.modules, timing.batches, timing.total_s, timing.bytes_read / mib,
        timing.read_s, timing.to_device_s, timing.merge_s, timing.to_host_s, timing.bytes_written / mib, timing.write_s,
    )


class _Outputs:
    """The writers, the writer thread and the per-module records of every output folder of one run.

    Batches are written by one worker thread in submission order while the main thread reads and
    merges the next batch; ``pwrite`` releases the GIL, so the two overlap.
    """

    def __init__(self, plan: Plan, root: Path):
        self.plan = plan
        self.folders: dict[int | None, Path] = {}
        self.writers: dict[int | None, SafetensorsWriter] = {}
        self.records: dict[int | None, dict[str, dict[str, Any]]] = {}
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-write")
        self._futures: list[Future] = []
        specs = _tensor_specs(plan)
        for seed, final_path in plan.outputs:
            folder = root if final_path == plan.manifest.output_path else root / final_path.name
            folder.mkdir(exist_ok=True)
            self.folders[seed] = folder
            self.writers[seed] = SafetensorsWriter(folder / WEIGHTS_NAME, specs, {"format": "pt"})
            self.records[seed] = {}

    def submit(self, seed: int | None, group: ModuleGroup, start: int, a: torch.Tensor, b: torch.Tensor, timing: GroupTiming) -> Future:
        """Queue host factors a (L, K, n) and b (L, m, K) of modules start … start + L - 1 for writing.

        ``a`` and ``b`` must stay unchanged until the returned future is done.
        """
        self._futures = [future for future in self._futures if not future.done() or future.exception()]
        future = self._thread.submit(self._write, seed, group, start, a, b, timing)
        self._futures.append(future)
        return future

    def submit_call(self, function: Any) -> Future:
        """Queue ``function()`` on the writer thread, after the writes queued before it."""
        future = self._thread.submit(function)
        self._futures.append(future)
        return future

    def record(self, seed: int | None, group: ModuleGroup, start: int, records: list[dict[str, Any]]) -> None:
        targets = list(self.writers) if seed is None else [seed]
        for offset, record in enumerate(records):
            for target in targets:
                self.records[target][group.module_paths[start + offset]] = record

    def _write(self, seed: int | None, group: ModuleGroup, start: int, a: torch.Tensor, b: torch.Tensor, timing: GroupTiming) -> None:
        began = time.perf_counter()
        a_shape, b_shape = group.output_shapes()
        targets = list(self.writers) if seed is None else [seed]
        for offset in range(a.shape[0]):
            a_key, b_key = _output_keys(self.plan, group, start + offset)
            for target in targets:
                self.writers[target].write(a_key, a[offset].reshape(a_shape))
                self.writers[target].write(b_key, b[offset].reshape(b_shape))
        timing.write_s += time.perf_counter() - began

    def wait(self) -> None:
        """Wait for every queued write, raising the first error one of them met."""
        for future in self._futures:
            future.result()
        self._futures = []

    def close(self) -> None:
        """Flush every output file to disk and close it."""
        for writer in self.writers.values():
            writer.close()

    def shutdown(self) -> None:
        """Stop the writer thread, dropping queued writes, and close any file still open without flushing it."""
        self._thread.shutdown(wait=True, cancel_futures=True)
        for writer in self.writers.values():
            writer.abort()


def _merge_group(plan: Plan, group: ModuleGroup, outputs: _Outputs, buffers: Buffers) -> GroupTiming:
    """Merge one group batch by batch: read, copy to the device, merge, copy back, queue the write."""
    method = get_method(group.spec.method)
    weights = [source.weight for source in plan.manifest.sources]
    seeds = [seed for seed, _ in plan.outputs] if method.uses_seed else [None]
    batches = group.layer_batches(plan.batch_bytes)
    itemsize = plan.output_dtype.itemsize
    timing = GroupTiming(
        projection=group.projection,
        method=method.name,
        modules=len(group.module_paths),
        batches=len(batches),
        bytes_read=group.bytes_read,
        bytes_returned=len(seeds) * group.output_elements() * itemsize,
        bytes_written=len(plan.outputs) * group.output_elements() * itemsize,
    )

    for start, stop in batches:
        began = time.perf_counter()
        slots, used = read_batch(plan, group, start, stop, buffers.staging)
        timing.bytes_staged += used
        read = time.perf_counter()

        tensors = to_device(plan, buffers, slots, used)
        check_finite(plan, group, start, tensors)
        copied = time.perf_counter()
        timing.read_s += read - began
        timing.to_device_s += copied - read

        for seed in seeds:
            merge_began = time.perf_counter()
            result = method.merge(
                GroupInput(
                    module_paths=group.module_paths[start:stop],
                    a=tensors[0::2],
                    b=tensors[1::2],
                    scales=group.source_scales,
                    weights=weights,
                    rank=group.spec.rank,
                    params=dict(group.spec.params),
                    seed=seed,
                    out=buffers.result_views(group, stop - start),
                    scratch=buffers.scratch,
                )
            )
            if result.scale != group.output_scale or result.a.shape[1] != group.output_rank:
                raise RuntimeError(f"{method.name} returned rank {result.a.shape[1]} scale {result.scale}, planned {group.output_rank} {group.output_scale}")
            synchronize(plan.device)
            merged = time.perf_counter()
            a, b = to_host(plan, group, buffers, result.a, result.b)
            buffers.written_by(outputs.submit(seed, group, start, a, b, timing))
            outputs.record(seed, group, start, result.records)
            timing.merge_s += merged - merge_began
            timing.to_host_s += time.perf_counter() - merged
        logger.debug(
            "%s %s modules %d-%d: read in %.3f s, merged in %.3f s",
            group.projection, method.name, start, stop - 1, read - began, time.perf_counter() - copied,
        )
    return timing


def _provenance(plan: Plan, seed: int | None, files: dict[str, str], source_hashes: dict, records: dict, wall_time: float) -> dict[str, Any]:
    manifest = plan.manifest
    return {
        "lorakit_provenance": 1,
        "versions": package_versions(),
        "manifest": {
            "path": str(manifest.path),
            "sha256": manifest.sha256,
            "git": git_state(manifest.path),
            "normalised": manifest.normalised(),
        },
        "seed": seed,
        "device": str(plan.device),
        "output_dtype": str(plan.output_dtype).removeprefix("torch."),
        "sources": [
            {
                "name": adapter.name,
                "path": str(adapter.folder),
                "weight": source.weight,
                "files": {path.name: source_hashes[path] for path in adapter.files()},
                "r": adapter.config.get("r"),
                "lora_alpha": adapter.config.get("lora_alpha"),
                "use_rslora": bool(adapter.config.get("use_rslora")),
                "rank_pattern": adapter.config.get("rank_pattern") or {},
                "alpha_pattern": adapter.config.get("alpha_pattern") or {},
                "target_modules": adapter.config.get("target_modules"),
            }
            for adapter, source in zip(plan.adapters, manifest.sources)
        ],
        "excluded_projections": list(plan.excluded),
        "groups": [
            {
                "projection": group.projection,
                "method": group.spec.to_dict(),
                "chosen_by": group.spec.origin,
                "output_rank": group.output_rank,
                "output_scale": group.output_scale,
                "lora_alpha": output_alpha(group.output_rank, group.output_scale),
                "modules": list(group.module_paths),
                **({"records": {path: records[path] for path in group.module_paths if path in records}} if records else {}),
            }
            for group in plan.groups
        ],
        "files": files,
        "wall_time_s": round(wall_time, 3),
    }


def run_plan(
    plan: Plan, force: bool = False, progress: bool = True, timings: list[GroupTiming] | None = None
) -> list[RunResult]:
    """Execute ``plan`` and move the finished output into place.

    Args:
        plan: the plan to run.
        force: replace an existing output folder.
        progress: show a progress bar on stderr.
        timings: when given, receives one ``GroupTiming`` per group, in plan order.

    Raises:
        LorakitError: for an existing output without ``force`` or invalid input met while merging.
        OutputError: when writing fails; nothing is left at the output path then.
    """
    began = time.perf_counter()
    hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-hash")
    hash_cache = HashCache.default()
    source_files = [path for adapter in plan.adapters for path in adapter.files()]
    hash_futures = {path: hash_pool.submit(hash_cache.sha256, path) for path in source_files}

    folder = OutputFolder(plan.manifest.output_path, force)
    outputs: _Outputs | None = None
    try:
        try:
            outputs = _Outputs(plan, folder.temporary)
            buffers = Buffers(plan)
            bar = tqdm(plan.groups, desc=f"merging {plan.manifest.name}", unit="group", disable=not progress)
            with bar:
                for group in bar:
                    bar.set_postfix_str(f"{group.projection} {group.spec.method}")
                    timing = _merge_group(plan, group, outputs, buffers)
                    # Queued behind the group's writes, so the line includes their time.
                    outputs.submit_call(partial(_log_timing, timing))
                    if timings is not None:
                        timings.append(timing)
            # Every group reads every source, so the sources are done after the last group.
            for adapter in plan.adapters:
                adapter.close()
            outputs.wait()
            del buffers

            # Hashing reads the files back from the page cache while the writer thread flushes them.
            flushed = outputs.submit_call(outputs.close)
            weight_hashes = {seed: file_sha256(output_folder / WEIGHTS_NAME) for seed, output_folder in outputs.folders.items()}
            flushed.result()

            config = build_adapter_config(
                plan.adapters,
                [
                    (path, group.projection, group.output_rank, group.output_scale)
                    for group in plan.groups
                    for path in group.module_paths
                ],
            )
            source_hashes = {path: future.result() for path, future in hash_futures.items()}
            hash_cache.save()
            results = []
            for seed, final_path in plan.outputs:
                output_folder = outputs.folders[seed]
                (output_folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
                files = {CONFIG_NAME: file_sha256(output_folder / CONFIG_NAME), WEIGHTS_NAME: weight_hashes[seed]}
                record = _provenance(plan, seed, files, source_hashes, outputs.records[seed], time.perf_counter() - began)
                (output_folder / PROVENANCE_NAME).write_text(json.dumps(record, indent=2) + "\n")
                results.append(RunResult(seed=seed, path=final_path, files=files))
        except OutputError:
            raise
        except OSError as error:
            raise OutputError(f"{plan.manifest.output_path}: writing the output failed: {error.strerror or error}") from error
        finally:
            if outputs is not None:
                outputs.shutdown()
        folder.commit()
    except BaseException:
        folder.discard()
        raise
    finally:
        hash_pool.shutdown(wait=True, cancel_futures=True)
        for adapter in plan.adapters:
            adapter.close()
    logger.info("merged %d groups into %d output(s) in %.1f s", len(plan.groups), len(results), time.perf_counter() - began)
    return results
