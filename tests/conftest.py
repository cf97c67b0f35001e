"""Shared fixtures: real PEFT adapters on a tiny Llama built from a config (no download)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.hashcache import CACHE_ENV

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def tiny_llama() -> LlamaForCausalLM:
    """A 2-layer Llama with hidden size 32, made deterministically from seed 0."""
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session", autouse=True)
def hash_cache_folder(tmp_path_factory) -> Path:
    """Keep lorakit's source hash cache out of the user's home, here and in the CLI runs tests start."""
    folder = tmp_path_factory.mktemp("hash-cache")
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = previous


@pytest.fixture(scope="session")
def base_model() -> LlamaForCausalLM:
    return tiny_llama()


def make_adapter(
    base: LlamaForCausalLM,
    folder: Path,
    seed: int,
    r: int = 4,
    alpha: float = 8,
    targets: list[str] | None = None,
    save_format: str = "safetensors",
    dtype: torch.dtype = torch.float32,
    **config: Any,
) -> Path:
    """Save a PEFT LoRA adapter with seeded, nonzero A and B (B is zero after PEFT's own init)."""
    model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or TARGETS, task_type="CAUSAL_LM", **config),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
                parameter.data = parameter.data.to(dtype)
    model.save_pretrained(str(folder), safe_serialization=save_format == "safetensors")
    return folder


def peft_deltas(base: LlamaForCausalLM, folder: Path) -> dict[str, torch.Tensor]:
    """ΔW of every adapted module, computed by PEFT itself (``get_delta_weight``), in float32."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder))
    deltas = {}
    for name, module in model.named_modules():
        adapted = "default" in getattr(module, "lora_A", {}) or "default" in getattr(module, "lora_embedding_A", {})
        if hasattr(module, "get_delta_weight") and adapted:
            path = name.removeprefix("base_model.model.")
            deltas[path] = module.get_delta_weight("default").float().detach()
    return deltas


def write_manifest(folder: Path, body: dict[str, Any], name: str = "merge.yaml") -> Path:
    """Write a manifest (JSON is valid YAML) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(body, indent=2))
    return path


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real ``lorakit`` command line in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "lorakit.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))
