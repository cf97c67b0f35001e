"""PEFT round trip: each output loads with PeftModel.from_pretrained and gives the formula's logits."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel

from conftest import make_adapter, peft_deltas, saved_tensors, write_manifest
from lorakit.execute import run_plan
from lorakit.manifest import load_manifest
from lorakit.plan import build_plan

WEIGHTS = [0.5, 1.5, 1.0]


def expected_deltas(method: str, base, folders, output) -> dict[str, torch.Tensor]:
    """ΔW by each method's formula, from the sources (never from the output's factors)."""
    parts = [peft_deltas(base, folder) for folder in folders]
    if method == "cat":
        return {path: sum(w * part[path] for w, part in zip(WEIGHTS, parts)) for path in parts[0]}
    if method == "block":  # K = Σ r_i with equal ranks: the weighted mean
        return {path: sum(w * part[path] for w, part in zip(WEIGHTS, parts)) / 3 for path in parts[0]}
    factors = [saved_tensors(folder) for folder in folders]
    deltas = {}
    if method == "soups":
        for path in parts[0]:
            key = f"base_model.model.{path}"
            a = sum(w * f[f"{key}.lora_A.weight"] for w, f in zip(WEIGHTS, factors)) / sum(WEIGHTS)
            b = sum(w * f[f"{key}.lora_B.weight"] for w, f in zip(WEIGHTS, factors)) / sum(WEIGHTS)
            deltas[path] = 2.0 * b @ a
        return deltas
    record = json.loads((output / "provenance.json").read_text())
    draws = {path: d["draws"] for group in record["groups"] for path, d in group["records"].items()}
    for path in parts[0]:
        key = f"base_model.model.{path}"
        deltas[path] = sum(
            WEIGHTS[s] * 4 * 2.0 * torch.outer(factors[s][f"{key}.lora_B.weight"][:, j], factors[s][f"{key}.lora_A.weight"][j])
            for s, j in draws[path]
        ) / len(draws[path])
    return deltas


@pytest.mark.parametrize("method", ["block", "random", "soups", "cat"])
def test_output_logits_match_formula(base_model, tmp_path, method):
    folders = [make_adapter(base_model, tmp_path / f"s{seed}", seed, r=4, alpha=8) for seed in (11, 12, 13)]
    merge = {"method": method}
    if method in ("block", "random"):
        merge["rank"] = 12
    body = {
        "version": 1,
        "sources": [{"path": f"../{f.name}", "weight": w} for f, w in zip(folders, WEIGHTS)],
        "merge": merge,
        "seeds": [21],
        "output": {"path": "../out"},
    }
    run_plan(build_plan(load_manifest(write_manifest(tmp_path / "recipes", body)), device="cpu"), progress=False)
    output = tmp_path / "out"

    patched = copy.deepcopy(base_model)
    modules = dict(patched.named_modules())
    with torch.no_grad():
        for path, delta in expected_deltas(method, base_model, folders, output).items():
            modules[path].weight += delta

    merged = PeftModel.from_pretrained(copy.deepcopy(base_model), str(output)).eval()
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = patched(tokens).logits
        actual = merged(tokens).logits
        untouched = base_model(tokens).logits
    assert (expected - untouched).abs().max() > 1e-3, "the deltas are too small to test anything"
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
