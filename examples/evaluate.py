"""Evaluate LoRA adapters on the held-out split of the word-sentiment task.

The base model is loaded once. Each adapter folder is loaded on top of it with
``PeftModel.from_pretrained`` and unloaded again afterwards, so every adapter
is scored against the same clean base weights.

Example:
    python examples/evaluate.py --base examples/adapters/seed*
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

from peft import PeftModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sentiment_task  # noqa: E402

logger = logging.getLogger("evaluate")

SUBSET_SEED = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", nargs="*", type=Path, metavar="ADAPTER_DIR",
                        help="PEFT adapter folders (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--base", action="store_true", help="also evaluate the base model without an adapter")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="evaluate on a fixed random subset of N held-out words (seed 0) "
                             "instead of the whole held-out split")
    parser.add_argument("--batch-size", type=int, default=64, help="words per forward pass (default: 64)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results to FILE as JSON")
    args = parser.parse_args(argv)
    if not args.adapters and not args.base:
        parser.error("give at least one ADAPTER_DIR or --base")
    for folder in args.adapters:
        if not (folder / "adapter_config.json").is_file():
            parser.error(f"adapter folder {folder} has no adapter_config.json")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be positive, got {args.limit}")
    return args


def select_words(held_out, limit: int | None):
    if limit is None or limit >= len(held_out):
        return held_out
    return random.Random(SUBSET_SEED).sample(held_out, limit)


def evaluate_model(name: str, model, tokenizer, words, batch_size: int) -> dict:
    start_time = time.monotonic()
    p_yes = sentiment_task.predict_p_yes(model, tokenizer, [item.word for item in words], batch_size)
    result = {"name": name, **sentiment_task.score(p_yes, [item.label for item in words])}
    result["seconds"] = round(time.monotonic() - start_time, 1)
    logger.info("%s: accuracy %.4f, mean P(correct) %.4f (%.1f s)",
                name, result["accuracy"], result["mean_p_correct"], result["seconds"])
    return result


def print_table(results: list[dict], words, subset_note: str) -> None:
    n_positive = sum(item.label for item in words)
    print(f"\nHeld-out words: {len(words)} ({n_positive} positive, {len(words) - n_positive} negative){subset_note}")
    name_width = max(len("model"), *(len(result["name"]) for result in results))
    print(f"{'model':<{name_width}}  accuracy  mean P(correct)  mean P(yes)")
    for result in results:
        print(f"{result['name']:<{name_width}}  {result['accuracy']:8.4f}  "
              f"{result['mean_p_correct']:15.4f}  {result['mean_p_yes']:11.4f}")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)

    held_out = sentiment_task.build_splits().held_out
    words = select_words(held_out, args.limit)
    subset_note = "" if len(words) == len(held_out) else \
        f", a fixed random subset (seed {SUBSET_SEED}) of the {len(held_out)}-word held-out split"
    base_model, tokenizer = sentiment_task.load_base_model()

    results = []
    if args.base:
        results.append(evaluate_model("base", base_model, tokenizer, words, args.batch_size))
    for folder in args.adapters:
        # PEFT 0.21 upcasts the bfloat16 adapter weights to float32 while loading
        # (autocast_adapter_dtype=True), so the adapter runs in the base model's dtype.
        model = PeftModel.from_pretrained(base_model, folder, torch_device="cpu")
        results.append(evaluate_model(str(folder), model, tokenizer, words, args.batch_size))
        # unload() removes the LoRA layers and gives back the untouched base weights.
        base_model = model.unload()

    print_table(results, words, subset_note)
    if args.json is not None:
        payload = {
            "held_out_words": len(held_out),
            "evaluated_words": len(words),
            "positive_words": sum(item.label for item in words),
            "subset_seed": SUBSET_SEED if len(words) < len(held_out) else None,
            "results": results,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        logger.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
