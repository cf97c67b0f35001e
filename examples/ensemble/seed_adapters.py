"""Find or train one adapter per seed with the settings of ``examples/train_adapters.py``.

An adapter folder is reused when its ``training.json`` records the same training settings (steps,
batch size, learning rate, weight decay, noise temperature λ, number of training words). The
committed folder is checked first, then the study's cache. Missing seeds are trained in this
process with ``train_adapters.train_one`` and saved with ``train_adapters.save_adapter``, so
they match the committed adapters except for the seed.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

import train_adapters

__all__ = ["SETTING_KEYS", "find_adapter", "settings_tag", "train_missing"]

logger = logging.getLogger(__name__)

# training.json fields that must match for an adapter to count as trained with the same settings.
SETTING_KEYS = ("steps", "batch_size", "lr", "weight_decay", "noise_temperature", "train_words")


def settings_tag(settings: argparse.Namespace) -> str:
    """Name a settings combination for folder names, such as ``steps150-bs16-lr0.0003-wd0-lambda0``."""
    return (
        f"steps{settings.steps}-bs{settings.batch_size}-lr{settings.lr:g}"
        f"-wd{settings.weight_decay:g}-lambda{settings.noise_temperature:g}"
    )


def _matches(folder: Path, expected: dict) -> bool:
    record_path = folder / "training.json"
    if not (record_path.is_file() and (folder / "adapter_model.safetensors").is_file()):
        return False
    record = json.loads(record_path.read_text())
    differing = {key: (record.get(key), value) for key, value in expected.items() if record.get(key) != value}
    if differing:
        logger.info("%s: not reused, training settings differ (recorded, requested): %s", folder, differing)
    return not differing


def find_adapter(seed: int, folders: Sequence[Path], expected: dict) -> Path | None:
    """Return the first ``FOLDER/seed{seed}`` whose training.json matches ``expected``, or None."""
    for folder in folders:
        candidate = folder / f"seed{seed}"
        if _matches(candidate, expected):
            return candidate
    return None


def train_missing(
    seeds: Sequence[int], settings: argparse.Namespace, committed: Path, cache: Path, base_model, tokenizer, train_words
) -> dict[int, Path]:
    """Return the adapter folder of every seed, training the ones that no folder has yet into ``cache``.

    ``settings`` is a namespace from ``train_adapters.parse_args``. ``base_model`` must have
    ``requires_grad`` off on every parameter, as ``train_adapters.main`` leaves it.
    """
    expected = {key: getattr(settings, key) for key in SETTING_KEYS if key != "train_words"}
    expected["train_words"] = len(train_words)

    folders: dict[int, Path] = {}
    for seed in seeds:
        found = find_adapter(seed, [committed, cache], expected)
        if found is not None:
            logger.info("seed %d: reusing %s", seed, found)
            folders[seed] = found
            continue

        model, record = train_adapters.train_one(base_model, tokenizer, train_words, seed, settings)
        folder = cache / f"seed{seed}"
        train_adapters.save_adapter(model, record, folder)
        del model
        folders[seed] = folder
    return folders
