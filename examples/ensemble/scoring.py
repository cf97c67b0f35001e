"""P(yes) of each model on the evaluation words, cached on disk, and the scores built from it.

Every model is scored the same way: the prompt and the two-token softmax of
``sentiment_task.predict_p_yes``, on the base model with one PEFT adapter loaded on top
(float32 compute) and unloaded afterwards, as ``examples/evaluate.py`` does.

The cache file of a model is ``CACHE/<key>.json``, where the key is the sha256 of the evaluation
words with their labels, the adapter's ``adapter_config.json`` and its ``adapter_model.safetensors``.
A changed adapter or another word list therefore gets a new entry, and a stale P(yes) is never
read back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Sequence

import torch
from peft import PeftModel

import sentiment_task

__all__ = ["ProbabilityCache", "Scorer", "agreement", "output_ensemble", "paired_comparison"]

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def words_digest(words: Sequence[sentiment_task.LabeledWord]) -> str:
    """Return the sha256 of the words and labels in order."""
    text = json.dumps([[item.word, item.label] for item in words])
    return hashlib.sha256(text.encode()).hexdigest()


class ProbabilityCache:
    """P(yes) per word of every scored model, one JSON file per model under ``folder``."""

    def __init__(self, folder: Path, words: Sequence[sentiment_task.LabeledWord]):
        self.folder = folder
        self.words_sha256 = words_digest(words)
        self.folder.mkdir(parents=True, exist_ok=True)

    def key(self, adapter: Path | None) -> str:
        """Return the cache key of an adapter folder, or of the base model when ``adapter`` is None."""
        digest = hashlib.sha256(self.words_sha256.encode())
        if adapter is None:
            digest.update(sentiment_task.GGUF_FILE_NAME.encode())
        else:
            for name in ADAPTER_FILES:
                digest.update(name.encode())
                digest.update((adapter / name).read_bytes())
        return digest.hexdigest()

    def load(self, key: str) -> torch.Tensor | None:
        path = self.folder / f"{key}.json"
        if not path.is_file():
            return None
        return torch.tensor(json.loads(path.read_text())["p_yes"], dtype=torch.float32)

    def store(self, key: str, name: str, adapter: Path | None, p_yes: torch.Tensor, seconds: float) -> None:
        record = {
            "name": name,
            "adapter": str(adapter) if adapter is not None else None,
            "words_sha256": self.words_sha256,
            "seconds": round(seconds, 1),
            "p_yes": p_yes.tolist(),
        }
        # Write then rename, so an interrupted run never leaves a truncated entry behind.
        temporary = self.folder / f".{key}.json.tmp"
        temporary.write_text(json.dumps(record) + "\n")
        temporary.replace(self.folder / f"{key}.json")


class Scorer:
    """Compute P(yes) on a fixed word list for the base model and for adapters, through the cache."""

    def __init__(self, base_model, tokenizer, words: Sequence[sentiment_task.LabeledWord], cache: ProbabilityCache, batch_size: int):
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.words = list(words)
        self.labels = [item.label for item in words]
        self.cache = cache
        self.batch_size = batch_size

    def p_yes(self, name: str, adapter: Path | None) -> torch.Tensor:
        """Return P(yes) per word, shape (len(words),), from the cache or by running the model."""
        key = self.cache.key(adapter)
        cached = self.cache.load(key)
        if cached is not None:
            logger.info("%s: P(yes) from the cache (%s)", name, key[:12])
            return cached

        began = time.monotonic()
        texts = [item.word for item in self.words]
        if adapter is None:
            p_yes = sentiment_task.predict_p_yes(self.base_model, self.tokenizer, texts, self.batch_size)
        else:
            model = PeftModel.from_pretrained(self.base_model, adapter, torch_device="cpu")
            # Adapters are stored in bfloat16; compute in the base model's float32.
            model.to(torch.float32)
            try:
                p_yes = sentiment_task.predict_p_yes(model, self.tokenizer, texts, self.batch_size)
            finally:
                # unload() removes the LoRA layers and returns the untouched base model.
                self.base_model = model.unload()
        seconds = time.monotonic() - began
        self.cache.store(key, name, adapter, p_yes, seconds)
        logger.info("%s: accuracy %.4f (%.1f s)", name, self.score(p_yes)["accuracy"], seconds)
        return p_yes

    def score(self, p_yes: torch.Tensor) -> dict[str, float]:
        return sentiment_task.score(p_yes, self.labels)


def output_ensemble(p_yes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Average the models' P(yes) per word: the output-level ensemble, shape (words,)."""
    return torch.stack(list(p_yes)).mean(dim=0)


def agreement(p_yes: torch.Tensor, reference: torch.Tensor) -> float:
    """Return the fraction of words on which two models give the same answer (P(yes) > 0.5)."""
    return ((p_yes > 0.5) == (reference > 0.5)).float().mean().item()


def paired_comparison(first: torch.Tensor, second: torch.Tensor, labels: Sequence[int]) -> dict:
    """Compare two models on the same words with an exact two-sided sign test (McNemar's exact test).

    Only the discordant words count: ``only_first_correct`` (b) and ``only_second_correct`` (c).
    Under the null hypothesis of equal accuracy, b ~ Binomial(b + c, 1/2), and the p-value is
    min(1, 2 · P(X ≤ min(b, c))).
    """
    truth = torch.tensor(labels, dtype=torch.bool)
    first_correct = (first > 0.5) == truth
    second_correct = (second > 0.5) == truth
    only_first = int((first_correct & ~second_correct).sum())
    only_second = int((second_correct & ~first_correct).sum())
    discordant = only_first + only_second
    tail = sum(math.comb(discordant, k) for k in range(min(only_first, only_second) + 1)) / 2**discordant
    return {"only_first_correct": only_first, "only_second_correct": only_second, "p_value": min(1.0, 2 * tail)}
