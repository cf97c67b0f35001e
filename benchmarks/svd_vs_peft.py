"""Benchmark lorakit's factor-space svd against PEFT's add_weighted_adapter(combination_type="svd").

Both merge the same synthetic adapters: M sources of rank r on every attention and MLP projection
of a Llama with Llama-2-7B module shapes (hidden 4096, intermediate 11008), truncated to rank K.
The script reports the wall time of each merge and the relative Frobenius error of each result
against the exact weighted sum ΣΔ = Σ w_i s_i B_i A_i, computed in float64.

PEFT needs its base model in memory, so the model is built with uninitialised bfloat16 weights
(the merge never reads them) and only ``--layers`` decoder layers. Usage::

    python benchmarks/svd_vs_peft.py --layers 1 --workdir /tmp/svd-bench
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.execute import run_plan
from lorakit.manifest import load_manifest
from lorakit.plan import build_plan

logger = logging.getLogger("svd_vs_peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=1, help="decoder layers of the synthetic model (default 1)")
    parser.add_argument("--sources", type=int, default=4, help="number of source adapters M (default 4)")
    parser.add_argument("--source-rank", type=int, default=16, help="rank r of every source (default 16)")
    parser.add_argument("--rank", type=int, default=64, help="target rank K (default 64)")
    parser.add_argument("--hidden-size", type=int, default=4096, help="hidden size, a multiple of 128 (default 4096, as Llama-2-7B)")
    parser.add_argument("--intermediate-size", type=int, default=11008, help="MLP size (default 11008, as Llama-2-7B)")
    parser.add_argument("--workdir", type=Path, required=True, help="folder for the adapters and outputs; emptied first")
    return parser.parse_args()


def build_base(layers: int, hidden_size: int, intermediate_size: int) -> LlamaForCausalLM:
    """Build a bfloat16 Llama with ``layers`` layers of the given sizes, weights left uninitialised.

    The vocabulary is cut to 256 tokens because the embeddings are not adapted.
    """
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 128,
        num_key_value_heads=hidden_size // 128,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.to_empty(device="cpu").eval()


def make_sources(base: LlamaForCausalLM, count: int, rank: int, folder: Path):
    """Add ``count`` seeded random adapters to ``base``, save each, and return the PEFT model."""
    names = [f"source{index}" for index in range(count)]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(base, config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_" in parameter_name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    for name in names:
        model.save_pretrained(str(folder), selected_adapters=[name])
    return model, names


def lora_modules(model):
    """Yield (module path without the base_model.model. prefix, LoRA layer) for every adapted module."""
    for module_name, module in model.named_modules():
        if hasattr(module, "lora_A") and "merged" in module.lora_A:
            yield module_name.removeprefix("base_model.model."), module


def exact_sum(module, names: list[str], weights: list[float]) -> torch.Tensor:
    """ΣΔ = Σ w_i s_i B_i A_i of one module in float64, from the factors PEFT holds."""
    total = None
    for name, weight in zip(names, weights):
        delta = weight * module.scaling[name] * (module.lora_B[name].weight.double() @ module.lora_A[name].weight.double())
        total = delta if total is None else total + delta
    return total


class ErrorTotals:
    """Relative Frobenius error over all modules together, and the largest per module."""

    def __init__(self):
        self.squared_error = 0.0
        self.squared_norm = 0.0
        self.worst = 0.0

    def add(self, merged: torch.Tensor, exact: torch.Tensor) -> None:
        error = float((merged.double() - exact).norm().square())
        norm = float(exact.norm().square())
        self.squared_error += error
        self.squared_norm += norm
        self.worst = max(self.worst, math.sqrt(error / norm))

    def to_dict(self) -> dict[str, float]:
        return {"overall": math.sqrt(self.squared_error / self.squared_norm), "max_module": self.worst}


def peft_merge(model, names: list[str], weights: list[float], rank: int) -> float:
    """Run PEFT's svd merge into a new adapter named ``merged`` and return its wall time in seconds."""
    began = time.perf_counter()
    model.add_weighted_adapter(names, weights, "merged", combination_type="svd", svd_rank=rank)
    return time.perf_counter() - began


def lorakit_manifest(folder: Path, names: list[str], weights: list[float], rank: int, output: str) -> Path:
    recipe = folder / "recipe"
    recipe.mkdir(exist_ok=True)
    body = {
        "version": 1,
        "sources": [{"path": f"../{name}", "weight": weight} for name, weight in zip(names, weights)],
        "merge": {"method": "svd", "rank": rank},
        "output": {"path": f"../{output}"},
    }
    path = recipe / f"{output}.yaml"
    path.write_text(json.dumps(body, indent=2))
    return path


def lorakit_delta(tensors: dict[str, torch.Tensor], scale: float, path: str) -> torch.Tensor:
    """s · B @ A of one module of a lorakit output, float64."""
    a = tensors[f"base_model.model.{path}.lora_A.weight"].double()
    b = tensors[f"base_model.model.{path}.lora_B.weight"].double()
    return scale * (b @ a)


def cpu_name() -> str:
    """Return the CPU model from /proc/cpuinfo, or the platform's machine name elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    arguments = parse_arguments()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    folder = arguments.workdir
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    weights = [1.0, 0.5, -0.75, 0.25, 1.5, -0.5, 0.8, 1.2][: arguments.sources]

    logger.info("building a %d-layer model and %d adapters", arguments.layers, arguments.sources)
    model, names = make_sources(
        build_base(arguments.layers, arguments.hidden_size, arguments.intermediate_size),
        arguments.sources, arguments.source_rank, folder)

    logger.info("lorakit run (CLI subprocess)")
    manifest = lorakit_manifest(folder, names, weights, arguments.rank, "lorakit-cli")
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lorakit.cli", "run", str(manifest), "--device", "cpu", "--no-progress"], check=True)
    cli_seconds = time.perf_counter() - began

    logger.info("lorakit run_plan (in process)")
    manifest = lorakit_manifest(folder, names, weights, arguments.rank, "lorakit")
    plan = build_plan(load_manifest(manifest), device="cpu")
    began = time.perf_counter()
    run_plan(plan, progress=False)
    merge_seconds = time.perf_counter() - began

    logger.info("PEFT add_weighted_adapter(combination_type='svd', svd_rank=%d)", arguments.rank)
    peft_seconds = peft_merge(model, names, weights, arguments.rank)

    logger.info("comparing both results with the exact sum")
    output_config = json.loads((folder / "lorakit" / "adapter_config.json").read_text())
    output_scale = output_config["lora_alpha"] / output_config["r"]
    output_tensors = load_file(str(folder / "lorakit" / "adapter_model.safetensors"))
    peft_error, lorakit_error = ErrorTotals(), ErrorTotals()
    module_count = 0
    with torch.no_grad():
        for path, module in lora_modules(model):
            exact = exact_sum(module, names, weights)
            peft_error.add(module.get_delta_weight("merged"), exact)
            lorakit_error.add(lorakit_delta(output_tensors, output_scale, path), exact)
            module_count += 1

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu": cpu_name(),
            "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "peft": __import__("peft").__version__,
        },
        "layers": arguments.layers,
        "hidden_size": arguments.hidden_size,
        "intermediate_size": arguments.intermediate_size,
        "modules": module_count,
        "sources": arguments.sources,
        "source_rank": arguments.source_rank,
        "rank": arguments.rank,
        "weights": weights,
        "peft_seconds": round(peft_seconds, 3),
        "lorakit_run_plan_seconds": round(merge_seconds, 3),
        "lorakit_cli_seconds": round(cli_seconds, 3),
        "speedup_run_plan": round(peft_seconds / merge_seconds, 1),
        "speedup_cli": round(peft_seconds / cli_seconds, 1),
        "peft_relative_error": peft_error.to_dict(),
        "lorakit_relative_error": lorakit_error.to_dict(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
