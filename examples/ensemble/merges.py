"""Merged adapters for the ensemble study, written by lorakit from generated manifests.

Every merge goes through lorakit itself: a manifest is written to ``WORK/manifests/NAME.yaml`` and
run with ``load_manifest``, ``build_plan`` and ``run_plan``, the same code path as ``lorakit run``.
Outputs go to ``WORK/merged/NAME/`` (a drawing method writes ``seed-<seed>/`` folders below it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from lorakit.execute import RunResult, run_plan
from lorakit.manifest import load_manifest
from lorakit.methods import method_names
from lorakit.plan import build_plan

__all__ = ["MergedAdapter", "MergeSpec", "run_merge", "study_merges"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeSpec:
    """One lorakit merge of all sources: a method, its target rank K and the weight of every source.

    ``seeds`` is non-empty only for a method that draws at random, and gives one output per seed.
    """

    name: str
    method: str
    rank: int | None
    weight: float = 1.0
    seeds: tuple[int, ...] = ()

    def manifest(self, sources: Sequence[Path], manifest_folder: Path, output: Path) -> dict:
        """Build the manifest mapping, with paths relative to ``manifest_folder`` as lorakit expects."""
        merge: dict = {"method": self.method}
        if self.rank is not None:
            merge["rank"] = self.rank
        body: dict = {
            "version": 1,
            "name": self.name,
            "sources": [
                {"path": os.path.relpath(source, manifest_folder), "name": source.name, "weight": self.weight}
                for source in sources
            ],
            "merge": merge,
        }
        if self.seeds:
            body["seeds"] = list(self.seeds)
        body["output"] = {"path": os.path.relpath(output, manifest_folder), "dtype": "source"}
        return body


@dataclass(frozen=True)
class MergedAdapter:
    """One output folder of a merge; ``seed`` is None for a method that does not draw."""

    spec: MergeSpec
    seed: int | None
    path: Path


def study_merges(
    n_sources: int,
    total_rank: int,
    ranks: Sequence[int],
    random_seeds: Sequence[int],
    main_rank: int,
    sweep_random_seeds: int | None = None,
) -> list[MergeSpec]:
    """List the merges of the study, the headline rows first so a cut-short run still reports them.

    Headline: block with K = Σ r (the ensemble merge), block and random at ``main_rank``, soups, and
    svd at ``main_rank`` when the installed lorakit has it. Then block and random at every other
    rank in ``ranks``. Random merges use every seed of ``random_seeds`` at ``main_rank`` and the
    first ``sweep_random_seeds`` of them (default: all) at the other ranks. svd approximates Σ w_i ΔW_i, so its weights are 1/M to target the mean ΔW.
    Block, random and soups divide by K or by Σ w_i themselves, so their weights stay 1.

    Raises:
        ValueError: for a rank above ``total_rank``, which block cannot reach.
    """
    too_large = [rank for rank in ranks if rank > total_rank]
    if too_large or main_rank > total_rank:
        raise ValueError(f"merged ranks must be at most Σ r = {total_rank}, got {too_large or [main_rank]}")

    headline = [
        MergeSpec(f"block-k{total_rank}", "block", total_rank),
        MergeSpec(f"block-k{main_rank}", "block", main_rank),
        MergeSpec(f"random-k{main_rank}", "random", main_rank, seeds=tuple(random_seeds)),
        MergeSpec("soups", "soups", None),
    ]
    if "svd" in method_names():
        headline.append(MergeSpec(f"svd-k{main_rank}", "svd", main_rank, weight=1.0 / n_sources))
    else:
        logger.info("svd: not available in this lorakit (methods: %s)", ", ".join(method_names()))

    sweep_seeds = tuple(random_seeds[:sweep_random_seeds] if sweep_random_seeds is not None else random_seeds)
    sweep = []
    for rank in sorted(set(ranks)):
        if rank not in (total_rank, main_rank):
            sweep.append(MergeSpec(f"block-k{rank}", "block", rank))
        if rank != main_rank:
            sweep.append(MergeSpec(f"random-k{rank}", "random", rank, seeds=sweep_seeds))
    return headline + sweep


def run_merge(spec: MergeSpec, sources: Sequence[Path], work: Path) -> list[MergedAdapter]:
    """Write the manifest of ``spec`` under ``work`` and merge ``sources`` with lorakit.

    An existing output is replaced. lorakit writes byte-identical files for the same inputs and
    manifest, so a re-run keeps the content hashes that the probability cache is keyed on.
    """
    manifest_folder = work / "manifests"
    manifest_folder.mkdir(parents=True, exist_ok=True)
    manifest_path = manifest_folder / f"{spec.name}.yaml"
    output = work / "merged" / spec.name
    output.parent.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(yaml.safe_dump(spec.manifest(sources, manifest_folder, output), sort_keys=False))

    results: list[RunResult] = run_plan(build_plan(load_manifest(manifest_path), device="cpu"), force=True, progress=False)
    logger.info("merged %s into %s", manifest_path, ", ".join(str(result.path) for result in results))
    return [MergedAdapter(spec=spec, seed=result.seed, path=result.path) for result in results]
