"""Compare merged adapters with the exact mean of their sources' deltas, in weight space.

For every module, ΔW = s · B @ A in float64 (s = lora_alpha / r, read by lorakit as PEFT resolves
it). The reference is the mean delta of the sources, ΔW̄ = (1/M) Σ_i ΔW_i. For a merged adapter
with deltas ΔW', over all modules together:

    relative error = ‖ΔW' − ΔW̄‖_F / ‖ΔW̄‖_F        relative norm = ‖ΔW'‖_F / ‖ΔW̄‖_F

Block with K = Σ r gives ΔW̄ up to the rounding of the output dtype, so the error of the other
merges shows how far each one is from the ensemble average before any model runs.

    python examples/ensemble/deltas.py examples/ensemble/cache/steps150-bs16-lr0.0003-wd0-lambda0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lorakit.adapter import Adapter, open_adapter

__all__ = ["adapter_deltas", "compare_with_mean", "main"]


def adapter_deltas(adapter: Adapter) -> dict[str, torch.Tensor]:
    """Return ΔW = s · B @ A of every module of ``adapter`` in float64, with convolution factors flattened."""
    deltas = {}
    for path, module in adapter.modules.items():
        a = adapter.read(module.a_key).to(torch.float64).reshape(module.rank, -1)
        b = adapter.read(module.b_key).to(torch.float64).reshape(-1, module.rank)
        deltas[path] = module.scale * (b @ a)
    return deltas


def compare_with_mean(sources: list[Path], merged: list[Path]) -> dict[str, dict[str, float]]:
    """Return {merged folder name: {"relative_error", "relative_norm"}} against the sources' mean delta."""
    totals: dict[str, torch.Tensor] = {}
    for folder in sources:
        adapter = open_adapter(folder, folder.name)
        for path, delta in adapter_deltas(adapter).items():
            totals[path] = totals[path] + delta if path in totals else delta
        adapter.close()
    mean = {path: total / len(sources) for path, total in totals.items()}
    mean_norm = sum(float(delta.square().sum()) for delta in mean.values()) ** 0.5

    results = {}
    for folder in merged:
        adapter = open_adapter(folder, folder.name)
        deltas = adapter_deltas(adapter)
        adapter.close()
        if sorted(deltas) != sorted(mean):
            raise ValueError(f"{folder}: adapts other modules than the sources")
        error = sum(float((deltas[path] - mean[path]).square().sum()) for path in mean) ** 0.5
        norm = sum(float(delta.square().sum()) for delta in deltas.values()) ** 0.5
        results[str(folder)] = {"relative_error": error / mean_norm, "relative_norm": norm / mean_norm}
    return results


def _study_folders(work: Path) -> tuple[list[Path], list[Path]]:
    """Find the source adapters a study used and every merged adapter folder it wrote."""
    results = json.loads((work / "results.json").read_text())
    sources = [Path(results["models"][f"seed{seed}"]["path"]) for seed in results["seeds"]]
    merged = sorted(
        {path.parent for path in (work / "merged").rglob("adapter_model.safetensors")},
        key=lambda path: str(path),
    )
    return sources, merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="a study's WORK folder, with results.json and merged/; "
                        "its source adapters are compared too")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    sources, merged = _study_folders(args.work)
    # The sources themselves first: how far one adapter is from the mean of all of them.
    results = compare_with_mean(sources, sources + merged)
    names = {str(folder): f"{folder.name} (source)" for folder in sources}
    names.update({str(folder): str(folder.relative_to(args.work / "merged")) for folder in merged})
    print("| adapter | ‖ΔW' − ΔW̄‖ / ‖ΔW̄‖ | ‖ΔW'‖ / ‖ΔW̄‖ |")
    print("| --- | ---: | ---: |")
    for folder, figures in results.items():
        print(f"| {names[folder]} | {figures['relative_error']:.4f} | {figures['relative_norm']:.4f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
