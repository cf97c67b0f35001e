"""Executing a plan: read each batch's factors, merge them on the device, stream the output.

Memory stays bounded by one batch of one group (``lorakit.batches``). Batches run in the order
of the output file. For each, the main thread reads the factors with ``pread`` into a reused
staging buffer and moves them to the device in one copy. One call of the method merges all the
batch's layers, and the result is cast and moved back in one copy. A writer thread writes it at
its planned offsets while the main thread goes on with the next batch. The hashing thread hashes
the output file as it becomes final.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lorakit.batches import Buffers, check_finite, prefetch_batch, read_batch, synchronize, to_device, to_host
from lorakit.errors import AdapterError, LorakitError, OutputError
from lorakit.hashcache import HashCache
from lorakit.methods import GroupInput, get_method
from lorakit.modelcard import CARD_NAME, render_model_card
from lorakit.peft_config import build_adapter_config, output_alpha
from lorakit.plan import Batch, ModuleGroup, Plan
from lorakit.provenance import PROVENANCE_NAME, file_sha256, git_state, package_versions
from lorakit.writer import FileDigest, OutputFolder, SafetensorsWriter

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
    if plan.modules_to_save is not None:
        specs.extend(plan.modules_to_save.tensors)
    specs.extend(plan.base_layers)
    return specs


@dataclass
class GroupTiming:
    """Where one group's time went, in seconds, and the bytes it moved.

    ``bytes_read`` counts the stored input bytes and ``bytes_staged`` the same bytes in the
    staging buffer, slightly more because each factor's slot is aligned. ``bytes_returned``
    counts the merged factors copied back to the host, once per seed for methods that draw, and
    ``bytes_written`` the tensor bytes written over every output file. ``to_device_s`` covers the copy to the device
    (none on the CPU), the float32 conversion and the finite check, and ``to_host_s`` the cast to
    the output dtype and the copy back. ``write_s`` is spent in the writer thread while the next
    batch is read and merged, so ``total_s`` exceeds the group's share of the wall time.
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
    merges the next batch. ``pwrite`` releases the GIL, so the two overlap. Whenever a write
    makes more of a file final, the hashing thread ``hasher`` reads the new bytes back and hashes
    them. Batches run in file order (``Plan.batches``), so the file's sha256 is ready soon after
    its last write instead of taking a pass over the whole file at the end.
    """

    def __init__(self, plan: Plan, root: Path, hasher: ThreadPoolExecutor):
        self.plan = plan
        self.folders: dict[int | None, Path] = {}
        self.writers: dict[int | None, SafetensorsWriter] = {}
        self.digests: dict[int | None, FileDigest] = {}
        self.records: dict[int | None, dict[str, dict[str, Any]]] = {}
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-write")
        self._hasher = hasher
        self._futures: list[Future] = []
        self._hash_futures: list[Future] = []
        self._queued: dict[int | None, int] = {}
        specs = _tensor_specs(plan)
        for seed, final_path in plan.outputs:
            folder = root if final_path == plan.manifest.output_path else root / final_path.name
            folder.mkdir(exist_ok=True)
            self.folders[seed] = folder
            self.writers[seed] = SafetensorsWriter(folder / WEIGHTS_NAME, specs, {"format": "pt"})
            self.digests[seed] = FileDigest(folder / WEIGHTS_NAME)
            self._queued[seed] = 0
            self.records[seed] = {}

    def submit(self, seed: int | None, batch: Batch, a: torch.Tensor, b: torch.Tensor, timing: GroupTiming) -> Future:
        """Queue host factors a (L, K, n) and b (L, m, K) of the batch's L modules for writing.

        ``a`` and ``b`` must stay unchanged until the returned future is done.
        """
        self._futures = [future for future in self._futures if not future.done() or future.exception()]
        future = self._thread.submit(self._write, seed, batch, a, b, timing)
        self._futures.append(future)
        return future

    def submit_call(self, function: Any) -> Future:
        """Queue ``function()`` on the writer thread, after the writes queued before it."""
        future = self._thread.submit(function)
        self._futures.append(future)
        return future

    def record(self, seed: int | None, batch: Batch, records: list[dict[str, Any]]) -> None:
        targets = list(self.writers) if seed is None else [seed]
        for path, record in zip(batch.module_paths, records):
            for target in targets:
                self.records[target][path] = record

    def _write(self, seed: int | None, batch: Batch, a: torch.Tensor, b: torch.Tensor, timing: GroupTiming) -> None:
        began = time.perf_counter()
        a_shape, b_shape = batch.group.output_shapes()
        targets = list(self.writers) if seed is None else [seed]
        for offset, index in enumerate(batch.indices):
            a_key, b_key = _output_keys(self.plan, batch.group, index)
            for target in targets:
                self.writers[target].write(a_key, a[offset].reshape(a_shape))
                self.writers[target].write(b_key, b[offset].reshape(b_shape))
        for target in targets:
            self._hash_to(target, self.writers[target].complete_bytes)
        timing.write_s += time.perf_counter() - began

    def _hash_to(self, seed: int | None, end: int) -> None:
        if end > self._queued[seed]:
            self._queued[seed] = end
            self._hash_futures.append(self._hasher.submit(self.digests[seed].update_to, end))

    def wait(self) -> None:
        """Wait for every queued write, raising the first error one of them met."""
        for future in self._futures:
            future.result()
        self._futures = []

    def close(self) -> dict[int | None, str]:
        """Flush every output file to disk, close it, and return the sha256 of each, after ``wait``."""
        for seed, writer in self.writers.items():
            writer.close()
            self._hash_to(seed, writer.size)
        for future in self._hash_futures:
            future.result()
        return {seed: digest.hexdigest() for seed, digest in self.digests.items()}

    def shutdown(self) -> None:
        """Stop the writer thread, dropping queued writes, and close any file still open without flushing it."""
        self._thread.shutdown(wait=True, cancel_futures=True)
        for writer in self.writers.values():
            writer.abort()


def _copy_saved_modules(plan: Plan, outputs: _Outputs) -> None:
    """Copy the modules_to_save weights of the chosen source into every output, unchanged."""
    adapter = plan.adapters[plan.modules_to_save.source]
    for key, _, _ in plan.modules_to_save.tensors:
        tensor = adapter.read(key)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterError(f"{adapter.weights_path}: modules_to_save tensor {key!r} has NaN or Inf values; the adapter is corrupt")
        for writer in outputs.writers.values():
            writer.write(key, tensor)


def _copy_base_layers(plan: Plan, outputs: _Outputs) -> None:
    """Copy the base embedding weights into every output after checking that every source saved the same ones."""
    first = plan.adapters[0]
    for key, _, _ in plan.base_layers:
        tensor = first.read(key)
        # Compared as bytes, so NaN payloads and signed zeros must match too.
        stored = tensor.reshape(-1).view(torch.uint8)
        for adapter in plan.adapters[1:]:
            if not torch.equal(adapter.read(key).reshape(-1).view(torch.uint8), stored):
                raise AdapterError(
                    f"{adapter.weights_path}: base embedding weights {key!r} differ from those of source {first.name!r}, "
                    "so the sources were trained on different or resized base models; merge sources of one base "
                    f"model, or leave projection {key.split('.')[-3]!r} out with merge.include"
                )
        for writer in outputs.writers.values():
            writer.write(key, tensor)


def _new_timing(plan: Plan, group: ModuleGroup, batches: int) -> GroupTiming:
    method = get_method(group.spec.method)
    seeds = len(plan.outputs) if method.uses_seed else 1
    size = group.output_elements() * plan.output_dtype.itemsize
    return GroupTiming(
        projection=group.projection,
        method=method.name,
        modules=len(group.module_paths),
        batches=batches,
        bytes_read=group.bytes_read,
        bytes_returned=seeds * size,
        bytes_written=len(plan.outputs) * size,
    )


def _check_output_finite(plan: Plan, batch: Batch, a: torch.Tensor, b: torch.Tensor) -> None:
    """Raise when merged factors hold NaN or Inf, for example after overflowing float16.

    As for the inputs, one float32 sum per factor screens the batch, because an elementwise
    ``isfinite`` allocates a bool per element. A non-finite sum is confirmed module by module.
    """
    for factor, values in (("lora_A", a), ("lora_B", b)):
        if bool(torch.isfinite(values.sum(dtype=torch.float32))):
            continue
        finite = torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
        if not finite.all():
            module = batch.module_paths[int((~finite).nonzero()[0])]
            raise LorakitError(
                f"merged {factor} of module {module!r} has NaN or Inf values in {plan.output_dtype}; "
                "the source weights are too large for this dtype: lower them or set output.dtype: float32"
            )


def _merge_batch(plan: Plan, batch: Batch, outputs: _Outputs, buffers: Buffers, timing: GroupTiming) -> None:
    """Merge one batch: read, copy to the device, merge per seed, copy back, queue the write."""
    group = batch.group
    method = get_method(group.spec.method)
    seeds = [seed for seed, _ in plan.outputs] if method.uses_seed else [None]
    count = len(batch.indices)

    began = time.perf_counter()
    slots, used = read_batch(plan, batch, buffers.staging)
    timing.bytes_staged += used
    read = time.perf_counter()

    tensors = to_device(plan, buffers, slots, used)
    check_finite(plan, batch, tensors)
    copied = time.perf_counter()
    timing.read_s += read - began
    timing.to_device_s += copied - read

    for seed in seeds:
        merge_began = time.perf_counter()
        result = method.merge(
            GroupInput(
                module_paths=batch.module_paths,
                a=tensors[0::2],
                b=tensors[1::2],
                scales=group.source_scales,
                weights=[source.weight for source in plan.manifest.sources],
                rank=group.spec.rank,
                params=dict(group.spec.params),
                seed=seed,
                out=buffers.result_views(group, count),
                scratch=buffers.scratch,
            )
        )
        if result.scale != group.output_scale or result.a.shape[1] != group.output_rank:
            raise RuntimeError(f"{method.name} returned rank {result.a.shape[1]} scale {result.scale}, planned {group.output_rank} {group.output_scale}")
        synchronize(plan.device)
        merged = time.perf_counter()
        a, b = to_host(plan, group, buffers, result.a, result.b)
        _check_output_finite(plan, batch, a, b)
        buffers.written_by(outputs.submit(seed, batch, a, b, timing))
        outputs.record(seed, batch, result.records)
        timing.merge_s += merged - merge_began
        timing.to_host_s += time.perf_counter() - merged
    logger.debug(
        "%s %s, %d modules from %s: read in %.3f s, merged in %.3f s",
        group.projection, method.name, count, batch.module_paths[0], read - began, time.perf_counter() - copied,
    )


def _merge_all(plan: Plan, outputs: _Outputs, progress: bool) -> list[GroupTiming]:
    """Merge every batch in the plan's order; return one timing per group, in plan order."""
    batches = plan.batches()
    remaining = Counter(batch.group for batch in batches)
    timings = {group: _new_timing(plan, group, remaining[group]) for group in plan.groups}
    buffers = Buffers(plan)
    # disable=None hides the bar when stderr is not a terminal (CI logs), so errors stay readable.
    bar = tqdm(batches, desc=f"merging {plan.manifest.name}", unit="batch", disable=None if progress else True)
    with bar:
        for index, batch in enumerate(bar):
            bar.set_postfix_str(f"{batch.group.projection} {batch.group.spec.method}")
            # The disk reads the next batch while this one merges.
            if index + 1 < len(batches):
                prefetch_batch(plan, batches[index + 1])
            _merge_batch(plan, batch, outputs, buffers, timings[batch.group])
            remaining[batch.group] -= 1
            if not remaining[batch.group]:
                # Queued behind the group's writes, so the line includes their time.
                outputs.submit_call(partial(_log_timing, timings[batch.group]))
    return [timings[group] for group in plan.groups]


def _provenance(plan: Plan, seed: int | None, files: dict[str, str], source_hashes: dict, records: dict, wall_time: float) -> dict[str, Any]:
    manifest = plan.manifest
    return {
        "lorakit_provenance": 1,
        "versions": package_versions(),
        "manifest": {
            "path": str(manifest.path.resolve()),
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
        "modules_to_save": plan.modules_to_save_record(),
        "base_layers": [key for key, _, _ in plan.base_layers],
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
        AdapterError: for invalid input met while merging (NaN or Inf values).
        OutputError: for an existing output without ``force``, another run writing the same output,
            or a failed write; nothing is left at the output path then.
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
            outputs = _Outputs(plan, folder.temporary, hash_pool)
            # The copies go first, before any write is queued to the writer thread, so a corrupt
            # modules_to_save tensor or a mismatched base embedding fails the run before any merging.
            if plan.modules_to_save is not None:
                _copy_saved_modules(plan, outputs)
            _copy_base_layers(plan, outputs)
            group_timings = _merge_all(plan, outputs, progress)
            if timings is not None:
                timings.extend(group_timings)
            outputs.wait()
            # Every group reads every source, so the sources are done after the last batch.
            for adapter in plan.adapters:
                adapter.close()
            weight_hashes = outputs.close()

            config = build_adapter_config(
                plan.adapters,
                [
                    (path, group.projection, group.output_rank, group.output_scale)
                    for group in plan.groups
                    for path in group.module_paths
                ],
                plan.modules_to_save.names if plan.modules_to_save is not None else None,
            )
            source_hashes = {path: future.result() for path, future in hash_futures.items()}
            hash_cache.save()
            results = []
            for seed, final_path in plan.outputs:
                output_folder = outputs.folders[seed]
                (output_folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
                files = {CONFIG_NAME: file_sha256(output_folder / CONFIG_NAME), WEIGHTS_NAME: weight_hashes[seed]}
                card = render_model_card(plan, seed, final_path.name, config, files, source_hashes)
                (output_folder / CARD_NAME).write_text(card, encoding="utf-8")
                files[CARD_NAME] = file_sha256(output_folder / CARD_NAME)
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
        if not folder.committed:
            folder.discard()
        raise
    finally:
        hash_pool.shutdown(wait=True, cancel_futures=True)
        for adapter in plan.adapters:
            adapter.close()
    logger.info("merged %d groups into %d output(s) in %.1f s", len(plan.groups), len(results), time.perf_counter() - began)
    return results
