"""Train the example LoRA adapters on the word-sentiment task.

Each seed produces one adapter in ``OUT/seed{N}/``: PEFT's adapter_config.json,
adapter_model.safetensors in bfloat16, and training.json with the settings and
the loss curve. The base model is loaded once and deep-copied for every seed,
so each run starts from the same clean weights.

Example:
    python examples/train_adapters.py --seeds 100 200 300 400 --out examples/adapters
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sentiment_task  # noqa: E402

logger = logging.getLogger("train_adapters")

ADAPTER_NAME = "default"
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 200, 300, 400],
                        help="one adapter is trained per seed; the seed sets the LoRA init, "
                             "the data order and the Langevin noise (default: 100 200 300 400)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per adapter (default: 150)")
    parser.add_argument("--batch-size", type=int, default=16, help="words per optimizer step (default: 16)")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default: 3e-4)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    parser.add_argument("--noise-temperature", type=float, default=0.0, metavar="LAMBDA",
                        help="after each optimizer step add sqrt(2 * LAMBDA * lr) * N(0, 1) noise "
                             "to every LoRA parameter (Langevin dynamics); 0 gives plain AdamW (default: 0)")
    parser.add_argument("--out", type=Path, default=Path("examples/adapters"),
                        help="output folder; adapters go to OUT/seed{N}/ (default: examples/adapters)")
    parser.add_argument("--log-every", type=int, default=5, help="log the mean loss every N steps (default: 5)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.log_every < 1:
        parser.error("--steps, --batch-size and --log-every must be positive")
    if args.noise_temperature < 0:
        parser.error(f"--noise-temperature must be >= 0, got {args.noise_temperature}")
    return args


def make_generators(seed: int) -> dict[str, torch.Generator]:
    """Create independent torch generators for LoRA init, data order and noise from one seed."""
    streams = ["init", "data", "noise"]
    children = np.random.SeedSequence(seed).spawn(len(streams))
    return {
        name: torch.Generator().manual_seed(int(child.generate_state(1, dtype=np.uint64)[0]))
        for name, child in zip(streams, children)
    }


def lora_config() -> LoraConfig:
    return LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=LORA_TARGET_MODULES,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )


def init_lora_weights(model, generator: torch.Generator) -> None:
    """Re-initialize every LoRA pair from ``generator`` with PEFT's default scheme.

    PEFT draws lora_A from the global RNG. Redrawing it here (Kaiming uniform
    with a=sqrt(5), lora_B zero, as PEFT 0.21 does) makes the init depend on
    the seed alone, not on what else used the global RNG before.
    """
    for module in model.modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            torch.nn.init.kaiming_uniform_(module.lora_A[ADAPTER_NAME].weight, a=math.sqrt(5), generator=generator)
            torch.nn.init.zeros_(module.lora_B[ADAPTER_NAME].weight)


def batches(n_examples: int, batch_size: int, generator: torch.Generator):
    """Yield index batches forever, reshuffling with ``generator`` at each epoch."""
    while True:
        order = torch.randperm(n_examples, generator=generator).tolist()
        for start in range(0, n_examples - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def add_langevin_noise(parameters, scale: float, generator: torch.Generator) -> None:
    with torch.no_grad():
        for parameter in parameters:
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.add_(noise.to(parameter.device), alpha=scale)


def train_one(base_model, tokenizer, train_words, seed: int, args: argparse.Namespace):
    """Train one LoRA adapter and return ``(peft_model, training_record)``."""
    generators = make_generators(seed)
    torch.manual_seed(seed)  # covers any global-RNG use inside PEFT or transformers
    model = get_peft_model(copy.deepcopy(base_model), lora_config())
    init_lora_weights(model, generators["init"])
    model.train()

    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    n_trainable = sum(parameter.numel() for parameter in trainable)
    logger.info("seed %d: %d trainable LoRA parameters", seed, n_trainable)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    noise_scale = math.sqrt(2 * args.noise_temperature * args.lr)

    yes_id, no_id = sentiment_task.answer_token_ids(tokenizer)
    batch_iterator = batches(len(train_words), args.batch_size, generators["data"])
    losses = []
    start_time = time.monotonic()
    for step in range(1, args.steps + 1):
        batch = [train_words[index] for index in next(batch_iterator)]
        targets = torch.tensor([yes_id if item.label else no_id for item in batch])
        logits = sentiment_task.answer_position_logits(model, tokenizer, [item.word for item in batch])
        # The loss is full-vocabulary cross-entropy on the answer token alone, so prompt tokens carry no loss.
        loss = F.cross_entropy(logits, targets.to(logits.device))

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if noise_scale > 0:
            add_langevin_noise(trainable, noise_scale, generators["noise"])

        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            recent = losses[-args.log_every :]
            elapsed = time.monotonic() - start_time
            logger.info("seed %d: step %d/%d, mean loss over last %d steps %.4f, %.1f s/step",
                        seed, step, args.steps, len(recent), sum(recent) / len(recent), elapsed / step)

    record = {
        "seed": seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "noise_temperature": args.noise_temperature,
        "train_words": len(train_words),
        "train_seconds": round(time.monotonic() - start_time, 1),
        "losses": [round(value, 5) for value in losses],
    }
    return model, record


def save_adapter(model, record: dict, folder: Path) -> None:
    """Save the adapter as bfloat16 safetensors and check the dtype of the written file."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.to(torch.bfloat16)
    # The weights come from the GGUF file, but the adapter belongs to the hub model.
    model.peft_config[ADAPTER_NAME].base_model_name_or_path = sentiment_task.BASE_MODEL_HUB_ID
    model.save_pretrained(folder, safe_serialization=True)
    # PEFT writes a model card template that is mostly placeholders, so drop it.
    # training.json records how the adapter was trained.
    (folder / "README.md").unlink(missing_ok=True)

    weights_path = folder / "adapter_model.safetensors"
    with safe_open(weights_path, framework="pt") as weights:
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}
    if dtypes != {"BF16"}:
        raise RuntimeError(f"expected only BF16 tensors in {weights_path}, found {sorted(dtypes)}")

    (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    logger.info("saved %s (%.2f MB)", folder, weights_path.stat().st_size / 1e6)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)

    splits = sentiment_task.build_splits()
    logger.info("train split: %d words (%d positive)", len(splits.train), sum(item.label for item in splits.train))
    base_model, tokenizer = sentiment_task.load_base_model()
    for parameter in base_model.parameters():
        parameter.requires_grad_(False)

    for seed in args.seeds:
        model, record = train_one(base_model, tokenizer, splits.train, seed, args)
        save_adapter(model, record, args.out / f"seed{seed}")
        logger.info("seed %d: done in %.1f s, final loss %.4f", seed, record["train_seconds"], record["losses"][-1])
        del model


if __name__ == "__main__":
    main()
