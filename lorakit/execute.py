"""Executing a plan: read each group's factors, merge them batched on the device, stream the output.

Memory stays bounded by one batch of one group: factors are read per module, stacked, merged,
cast and written at their planned offsets before the next batch is read.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lorakit.adapter import Adapter
from lorakit.errors import AdapterError, OutputError
from lorakit.methods import GroupInput, get_method
from lorakit.modelcard import CARD_NAME, render_model_card
from lorakit.peft_config import build_adapter_config, output_alpha
from lorakit.plan import ModuleGroup, Plan
from lorakit.provenance import PROVENANCE_NAME, file_sha256, git_state, package_versions
from lorakit.writer import OutputFolder, SafetensorsWriter

__all__ = ["RunResult", "run_plan"]

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
    return specs


def _stack(adapter: Adapter, group: ModuleGroup, start: int, stop: int, rank: int, factor: str, device: torch.device) -> torch.Tensor:
    """Read one factor of modules [start, stop) into a float32 tensor (L, r, n) for A or (L, m, r) for B."""
    count = stop - start
    shape = (count, rank, group.in_size) if factor == "A" else (count, group.out_features, rank)
    buffer = torch.empty(shape, dtype=torch.float32, pin_memory=device.type == "cuda")
    for offset, path in enumerate(group.module_paths[start:stop]):
        module = adapter.modules[path]
        tensor = adapter.read(module.a_key if factor == "A" else module.b_key)
        buffer[offset].copy_(tensor.reshape(shape[1:]))
    if not torch.isfinite(buffer).all():
        bad = next(i for i in range(count) if not torch.isfinite(buffer[i]).all())
        raise AdapterError(
            f"{adapter.weights_path}: module {group.module_paths[start + bad]!r} has NaN or Inf values in lora_{factor}; "
            "the adapter is corrupt or diverged in training"
        )
    return buffer.to(device, non_blocking=True)


class _Outputs:
    """The writers and per-module records of every output folder of one run."""

    def __init__(self, plan: Plan, root: Path):
        self.plan = plan
        self.folders: dict[int | None, Path] = {}
        self.writers: dict[int | None, SafetensorsWriter] = {}
        self.records: dict[int | None, dict[str, dict[str, Any]]] = {}
        specs = _tensor_specs(plan)
        for seed, final_path in plan.outputs:
            folder = root if final_path == plan.manifest.output_path else root / final_path.name
            folder.mkdir(exist_ok=True)
            self.folders[seed] = folder
            self.writers[seed] = SafetensorsWriter(folder / WEIGHTS_NAME, specs, {"format": "pt"})
            self.records[seed] = {}

    def write(self, seed: int | None, group: ModuleGroup, start: int, a: torch.Tensor, b: torch.Tensor, records: list) -> None:
        a_shape, b_shape = group.output_shapes()
        a = a.to(self.plan.output_dtype).cpu()
        b = b.to(self.plan.output_dtype).cpu()
        targets = list(self.writers) if seed is None else [seed]
        for offset in range(a.shape[0]):
            a_key, b_key = _output_keys(self.plan, group, start + offset)
            for target in targets:
                self.writers[target].write(a_key, a[offset].reshape(a_shape))
                self.writers[target].write(b_key, b[offset].reshape(b_shape))
                if records:
                    self.records[target][group.module_paths[start + offset]] = records[offset]

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def _copy_saved_modules(plan: Plan, outputs: _Outputs) -> None:
    """Copy the modules_to_save weights of the chosen source into every output, unchanged."""
    adapter = plan.adapters[plan.modules_to_save.source]
    for key, _, _ in plan.modules_to_save.tensors:
        tensor = adapter.read(key)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterError(f"{adapter.weights_path}: modules_to_save tensor {key!r} has NaN or Inf values; the adapter is corrupt")
        for writer in outputs.writers.values():
            writer.write(key, tensor)


def _merge_group(plan: Plan, group: ModuleGroup, outputs: _Outputs) -> None:
    method = get_method(group.spec.method)
    weights = [source.weight for source in plan.manifest.sources]
    seeds = [seed for seed, _ in plan.outputs] if method.uses_seed else [None]

    for start, stop in group.layer_batches(plan.batch_bytes):
        began = time.perf_counter()
        a = [_stack(adapter, group, start, stop, rank, "A", plan.device) for adapter, rank in zip(plan.adapters, group.source_ranks)]
        b = [_stack(adapter, group, start, stop, rank, "B", plan.device) for adapter, rank in zip(plan.adapters, group.source_ranks)]
        for seed in seeds:
            result = method.merge(
                GroupInput(
                    module_paths=group.module_paths[start:stop],
                    a=a,
                    b=b,
                    scales=group.source_scales,
                    weights=weights,
                    rank=group.spec.rank,
                    params=dict(group.spec.params),
                    seed=seed,
                )
            )
            if result.scale != group.output_scale or result.a.shape[1] != group.output_rank:
                raise RuntimeError(f"{method.name} returned rank {result.a.shape[1]} scale {result.scale}, planned {group.output_rank} {group.output_scale}")
            outputs.write(seed, group, start, result.a, result.b, result.records)
        logger.debug(
            "%s %s modules %d-%d merged in %.3f s", group.projection, method.name, start, stop - 1, time.perf_counter() - began
        )


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


def run_plan(plan: Plan, force: bool = False, progress: bool = True) -> list[RunResult]:
    """Execute ``plan`` and move the finished output into place.

    Raises:
        AdapterError: for invalid input met while merging (NaN or Inf values).
        OutputError: for an existing output without ``force``, another run writing the same output,
            or a failed write; nothing is left at the output path then.
    """
    began = time.perf_counter()
    hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorakit-hash")
    source_files = [path for adapter in plan.adapters for path in adapter.files()]
    hash_futures = {path: hash_pool.submit(file_sha256, path) for path in source_files}

    folder = OutputFolder(plan.manifest.output_path, force)
    try:
        try:
            outputs = _Outputs(plan, folder.temporary)
            # disable=None hides the bar when stderr is not a terminal (CI logs), so errors stay readable.
            bar = tqdm(plan.groups, desc=f"merging {plan.manifest.name}", unit="group", disable=None if progress else True)
            with bar:
                for group in bar:
                    bar.set_postfix_str(f"{group.projection} {group.spec.method}")
                    _merge_group(plan, group, outputs)
            if plan.modules_to_save is not None:
                _copy_saved_modules(plan, outputs)
            outputs.close()

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
            results = []
            for seed, final_path in plan.outputs:
                output_folder = outputs.folders[seed]
                (output_folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
                files = {name: file_sha256(output_folder / name) for name in (CONFIG_NAME, WEIGHTS_NAME)}
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
