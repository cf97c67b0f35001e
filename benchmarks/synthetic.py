"""Synthetic PEFT LoRA adapters with real model shapes, for benchmarks.

Each adapter folder holds an ``adapter_config.json`` and an ``adapter_model.safetensors`` laid out
as PEFT saves a LoRA adapter of a Llama model (keys
``base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight`` and so on). The values are
Gaussian (standard deviation 0.02) from a generator seeded per adapter. Drawing every value with
``torch.randn`` ran at about 45 M values/s on one core of the benchmark machine, so each adapter
draws one pool of at most 2^24 values and every tensor copies a slice of it at a seeded offset.
The tensors differ, the data stays seeded, and a 70B-shaped adapter takes seconds instead of
minutes.

Usage::

    python -m benchmarks.synthetic --shape llama2-7b --count 4 --rank 16 --dtype float32 DIR
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.writer import SafetensorsWriter

__all__ = ["SHAPES", "ModelShape", "adapter_bytes", "make_adapter", "make_adapters"]

_POOL_SIZE = 2**24
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelShape:
    """Layer count and projection sizes of a Llama-style decoder.

    ``kv_size`` is the output size of k_proj and v_proj: ``hidden`` with multi-head attention, less
    with grouped-query attention.
    """

    name: str
    layers: int
    hidden: int
    intermediate: int
    kv_size: int

    def projections(self) -> dict[str, tuple[str, int, int]]:
        """Return projection → (parent module, in_features, out_features)."""
        h, i, kv = self.hidden, self.intermediate, self.kv_size
        return {
            "q_proj": ("self_attn", h, h),
            "k_proj": ("self_attn", h, kv),
            "v_proj": ("self_attn", h, kv),
            "o_proj": ("self_attn", h, h),
            "gate_proj": ("mlp", h, i),
            "up_proj": ("mlp", h, i),
            "down_proj": ("mlp", i, h),
        }


SHAPES = {
    shape.name: shape
    for shape in (
        ModelShape("tiny", layers=4, hidden=64, intermediate=160, kv_size=16),
        ModelShape("llama2-7b", layers=32, hidden=4096, intermediate=11008, kv_size=4096),
        ModelShape("llama3-70b", layers=80, hidden=8192, intermediate=28672, kv_size=1024),
    )
}


def adapter_bytes(shape: ModelShape, rank: int, dtype: torch.dtype, projections: list[str] | None = None) -> int:
    """Return the tensor bytes of one adapter: layers · Σ_projections r · (in + out) · itemsize."""
    table = shape.projections()
    names = projections or list(table)
    return shape.layers * sum(rank * (table[name][1] + table[name][2]) for name in names) * dtype.itemsize


def make_adapter(
    folder: Path,
    shape: ModelShape,
    rank: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
    alpha: float | None = None,
    projections: list[str] | None = None,
) -> Path:
    """Write one synthetic adapter folder, streaming tensors so memory stays at one pool.

    Args:
        folder: the adapter folder to create.
        shape: the model's layer count and projection sizes.
        rank: r of every module.
        seed: seeds the value pool and the slice offsets.
        dtype: the stored dtype.
        alpha: lora_alpha; 2·r when omitted.
        projections: the adapted projections; all seven when omitted.
    """
    table = shape.projections()
    names = projections or list(table)
    folder.mkdir(parents=True, exist_ok=True)

    specs = []
    for layer in range(shape.layers):
        for name in names:
            parent, in_features, out_features = table[name]
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{name}"
            specs.append((f"{prefix}.lora_A.weight", (rank, in_features), dtype))
            specs.append((f"{prefix}.lora_B.weight", (out_features, rank), dtype))

    sizes = [math.prod(tensor_shape) for _, tensor_shape, _ in specs]
    pool_size = max(max(sizes), min(_POOL_SIZE, sum(sizes)))
    generator = torch.Generator().manual_seed(seed)
    pool = (torch.randn(pool_size, generator=generator) * 0.02).to(dtype)
    writer = SafetensorsWriter(folder / "adapter_model.safetensors", specs, {"format": "pt"})
    try:
        for (key, tensor_shape, _), count in zip(specs, sizes):
            start = int(torch.randint(pool_size - count + 1, (1,), generator=generator))
            writer.write(key, pool[start : start + count].reshape(tensor_shape))
    finally:
        writer.close()

    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": f"synthetic/{shape.name}",
        "r": rank,
        "lora_alpha": alpha if alpha is not None else 2 * rank,
        "target_modules": names,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def make_adapters(
    root: Path, shape: ModelShape, count: int, rank: int, dtype: torch.dtype, projections: list[str] | None = None
) -> list[Path]:
    """Write ``count`` adapters ``root/adapter-<i>`` with seeds 0 … count-1."""
    return [
        make_adapter(root / f"adapter-{index}", shape, rank, seed=index, dtype=dtype, projections=projections)
        for index in range(count)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="Folder that receives adapter-0, adapter-1, ...")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b", help="Model shape (default llama2-7b).")
    parser.add_argument("--count", type=int, default=4, help="Number of adapters (default 4).")
    parser.add_argument("--rank", type=int, default=16, help="r of every module (default 16).")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="Stored dtype (default float32).")
    arguments = parser.parse_args()
    make_adapters(arguments.folder, SHAPES[arguments.shape], arguments.count, arguments.rank, _DTYPES[arguments.dtype])


if __name__ == "__main__":
    main()
