"""Embedding and Conv1d/2d/3d LoRA through svd and the dense methods, reloaded by PEFT."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import peft_deltas, run_cli, saved_tensors, write_manifest
from peft import LoraConfig, get_peft_model
from torch import nn

from lorakit.methods.base import module_generator

TARGETS = ["embed", "conv1d", "conv2d", "pointwise", "conv3d", "linear"]
WEIGHTS = (0.8, 1.5)
RANK = 5


class LayerZoo(nn.Module):
    """One module of every layer kind PEFT's LoRA supports without quantization."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 12)
        self.conv1d = nn.Conv1d(6, 10, 3)
        self.conv2d = nn.Conv2d(4, 8, (3, 2))
        self.pointwise = nn.Conv2d(8, 6, 1)
        self.conv3d = nn.Conv3d(3, 7, (2, 2, 2))
        self.linear = nn.Linear(12, 9)


@pytest.fixture(scope="module")
def zoo() -> LayerZoo:
    torch.manual_seed(0)
    return LayerZoo().eval()


def make_zoo_adapter(base: LayerZoo, folder: Path, seed: int, r: int, alpha: float) -> Path:
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory, zoo) -> list[Path]:
    root = tmp_path_factory.mktemp("zoo-sources")
    return [make_zoo_adapter(zoo, root / "a", seed=41, r=3, alpha=6), make_zoo_adapter(zoo, root / "b", seed=42, r=4, alpha=4)]


def flat(delta: torch.Tensor, module: str) -> torch.Tensor:
    """A PEFT delta as the (m, n) matrix lorakit merges: convolutions flattened to (out, in·k…).

    PEFT returns an embedding's delta as (num_embeddings, embedding_dim), the transpose of B @ A.
    """
    matrix = delta.double()
    return matrix.T if module == "embed" else matrix.flatten(1)


def truncate(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    keep = max(1, round(density * delta.numel()))
    threshold = delta.abs().flatten().topk(keep).values[-1]
    return torch.where(delta.abs() >= threshold, delta, 0.0)


def expected_delta(method: str, module: str, weighted: list[torch.Tensor]) -> torch.Tensor:
    rank = min(RANK, *weighted[0].shape)
    if method == "cat":
        return sum(weighted)
    if method == "svd":
        return truncate(sum(weighted), rank)
    if method == "magnitude_prune":
        return truncate(sum(trim(delta, 0.4) for delta in weighted), rank)
    if method == "ties":
        stacked = torch.stack([trim(delta, 0.4) for delta in weighted])
        elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
        agrees = stacked.sign() == elected
        return truncate((stacked * agrees).sum(0) / agrees.sum(0).clamp(min=1), rank)
    generator = module_generator(9, module)
    dropped = [torch.where(torch.rand(delta.shape, generator=generator) < 0.6, delta, 0.0) / 0.6 for delta in weighted]
    return truncate(sum(dropped), rank)


@pytest.mark.parametrize("method", ["svd", "ties", "magnitude_prune", "dare_linear", "cat"])
def test_layer_kinds_round_trip_through_peft(tmp_path, zoo, sources, method):
    merge = {"method": method}
    if method != "cat":
        merge["rank"] = RANK
    if method in ("ties", "magnitude_prune"):
        merge["density"] = 0.4
    if method == "dare_linear":
        merge["density"] = 0.6
    body = {
        "version": 1,
        "sources": [{"path": str(path), "weight": weight} for path, weight in zip(sources, WEIGHTS)],
        "merge": merge,
        **({"seeds": [9]} if method == "dare_linear" else {}),
        "output": {"path": str(tmp_path / "output")},
    }
    completed = run_cli("run", str(write_manifest(tmp_path / "recipe", body)), "--device", "cpu", "--no-progress")
    assert completed.returncode == 0, completed.stderr
    output = Path(completed.stdout.strip())

    merged = peft_deltas(zoo, output)
    deltas = [peft_deltas(zoo, path) for path in sources]
    assert sorted(merged) == sorted(TARGETS)
    for module, delta in merged.items():
        weighted = [weight * flat(source[module], module) for weight, source in zip(WEIGHTS, deltas)]
        expected = expected_delta(method, module, weighted)
        actual = flat(delta, module)
        assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-6), module


def test_conv_factors_keep_kernel_shapes(tmp_path, sources):
    body = {
        "version": 1,
        "sources": [{"path": str(path)} for path in sources],
        "merge": {"method": "svd", "rank": RANK},
        "output": {"path": str(tmp_path / "output")},
    }
    completed = run_cli("run", str(write_manifest(tmp_path / "recipe", body)), "--device", "cpu", "--no-progress")
    assert completed.returncode == 0, completed.stderr
    tensors = saved_tensors(Path(completed.stdout.strip()))

    assert tensors["base_model.model.conv1d.lora_A.weight"].shape == (5, 6, 3)
    assert tensors["base_model.model.conv1d.lora_B.weight"].shape == (10, 5, 1)
    assert tensors["base_model.model.conv2d.lora_A.weight"].shape == (5, 4, 3, 2)
    assert tensors["base_model.model.conv2d.lora_B.weight"].shape == (8, 5, 1, 1)
    assert tensors["base_model.model.pointwise.lora_A.weight"].shape == (5, 8, 1, 1)
    assert tensors["base_model.model.conv3d.lora_A.weight"].shape == (5, 3, 2, 2, 2)
    assert tensors["base_model.model.conv3d.lora_B.weight"].shape == (7, 5, 1, 1, 1)
    assert tensors["base_model.model.embed.lora_embedding_A"].shape == (5, 40)
    assert tensors["base_model.model.embed.lora_embedding_B"].shape == (12, 5)
