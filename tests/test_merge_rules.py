"""Per-module rules: first match wins, layer ranges, unused rules, mixed output ranks reloaded by PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_adapter, peft_deltas, run_cli, saved_tensors

from lorakit.methods import method_names
from lorakit.methods.block import block_allocation
from lorakit.schema import load_schema

WEIGHTS = (1.0, 0.5)

RULES_MANIFEST = """\
version: 1
sources:
  - path: {a}
    weight: 1.0
  - path: {b}
    weight: 0.5
merge:
  method: svd
  rank: 6
  rules:
    - match: "model.layers.0.*"
      method: cat
    - match: "*.mlp.*"
      layers: [1, 1]
      method: ties
      rank: 3
      density: 0.5
  projections:
    v_proj:
      method: block
      rank: 4
output:
  path: {output}
"""


@pytest.fixture(scope="module")
def sources(tmp_path_factory, base_model) -> list[Path]:
    root = tmp_path_factory.mktemp("rule-sources")
    return [
        make_adapter(base_model, root / "a", seed=31, r=4, alpha=8),
        make_adapter(base_model, root / "b", seed=32, r=4, alpha=16),
    ]


def write_recipe(folder: Path, text: str, sources: list[Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "rules.yaml"
    path.write_text(text.format(a=sources[0], b=sources[1], output=folder.parent / "output"))
    return path


def truncate(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def ties_reference(deltas: list[torch.Tensor], density: float, rank: int) -> torch.Tensor:
    trimmed = []
    for delta in deltas:
        keep = max(1, round(density * delta.numel()))
        threshold = delta.abs().flatten().topk(keep).values[-1]
        trimmed.append(torch.where(delta.abs() >= threshold, delta, 0.0))
    stacked = torch.stack(trimmed)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agrees = stacked.sign() == elected
    return truncate((stacked * agrees).sum(0) / agrees.sum(0).clamp(min=1), rank)


def block_reference(sources: list[Path], module: str, rank: int) -> torch.Tensor:
    """(1/K) Σ_i w_i r_i s_i Σ_{j<c_i} b_ij a_ijᵀ, read from the source files."""
    total = 0
    for path, weight, count in zip(sources, WEIGHTS, block_allocation([4, 4], rank)):
        tensors = saved_tensors(path)
        config = json.loads((path / "adapter_config.json").read_text())
        a = tensors[f"base_model.model.{module}.lora_A.weight"].double()
        b = tensors[f"base_model.model.{module}.lora_B.weight"].double()
        scale = config["lora_alpha"] / config["r"]
        total = total + weight * 4 * scale * (b[:, :count] @ a[:count]) / rank
    return total


def test_rules_choose_method_per_module(tmp_path, sources):
    recipe = write_recipe(tmp_path / "recipe", RULES_MANIFEST, sources)
    completed = run_cli("plan", str(recipe), "--device", "cpu", "--json")
    assert completed.returncode == 0, completed.stderr
    plan = json.loads(completed.stdout)

    chosen = {module: (group["method"]["method"], group["chosen_by"], group["output_rank"]) for group in plan["groups"] for module in group["modules"]}
    for projection in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"):
        assert chosen[f"model.layers.0.{projection}"] == ("cat", "merge.rules[0]", 8)
    assert chosen["model.layers.1.mlp.up_proj"] == ("ties", "merge.rules[1]", 3)
    assert chosen["model.layers.1.mlp.down_proj"] == ("ties", "merge.rules[1]", 3)
    assert chosen["model.layers.1.self_attn.v_proj"] == ("block", "merge.projections.v_proj", 4)
    assert chosen["model.layers.1.self_attn.q_proj"] == ("svd", "merge", 6)
    assert chosen["model.layers.1.self_attn.k_proj"] == ("svd", "merge", 6)

    ties_group = next(group for group in plan["groups"] if group["chosen_by"] == "merge.rules[1]")
    assert ties_group["method"] == {"method": "ties", "rank": 3, "density": 0.5, "majority_sign_method": "total"}


def test_plan_text_names_rule(tmp_path, sources):
    recipe = write_recipe(tmp_path / "recipe", RULES_MANIFEST, sources)
    completed = run_cli("plan", str(recipe), "--device", "cpu")
    assert completed.returncode == 0, completed.stderr

    lines = completed.stdout.splitlines()
    assert any(line.startswith("up_proj") and "ties (rank=3, density=0.5" in line and "merge.rules[1]" in line for line in lines)
    assert any(line.startswith("q_proj") and "cat" in line and "merge.rules[0]" in line for line in lines)
    assert any(line.startswith("v_proj") and "block (rank=4)" in line and "merge.projections.v_proj" in line for line in lines)


def test_rules_output_reloads_in_peft(tmp_path, sources, base_model):
    recipe = write_recipe(tmp_path / "recipe", RULES_MANIFEST, sources)
    completed = run_cli("run", str(recipe), "--device", "cpu", "--no-progress")
    assert completed.returncode == 0, completed.stderr
    output = Path(completed.stdout.strip())

    config = json.loads((output / "adapter_config.json").read_text())
    assert config["r"] == 8
    assert config["rank_pattern"] == {
        r"^model\.layers\.1\.mlp\.down_proj$": 3,
        r"^model\.layers\.1\.mlp\.up_proj$": 3,
        r"^model\.layers\.1\.self_attn\.k_proj$": 6,
        r"^model\.layers\.1\.self_attn\.q_proj$": 6,
        r"^model\.layers\.1\.self_attn\.v_proj$": 4,
    }

    # PeftModel.from_pretrained fails on any shape mismatch, so this also checks every rank.
    merged = peft_deltas(base_model, output)
    deltas = [peft_deltas(base_model, path) for path in sources]
    assert len(merged) == 10
    for module, delta in merged.items():
        weighted = [weight * source[module].double() for weight, source in zip(WEIGHTS, deltas)]
        if module.startswith("model.layers.0."):
            expected = sum(weighted)
        elif ".mlp." in module:
            expected = ties_reference(weighted, 0.5, 3)
        elif module.endswith("v_proj"):
            expected = block_reference(sources, module, 4)
        else:
            expected = truncate(sum(weighted), 6)
        assert torch.allclose(delta.double(), expected, rtol=1e-4, atol=1e-6), module


UNUSED_RULE = """\
version: 1
sources:
  - path: {a}
  - path: {b}
merge:
  method: cat
  rules:
    - match: "*.mlp.*"
      method: svd
      rank: 2
    - match: "*.o_proj"
      method: svd
      rank: 2
    - match: "*.self_attn.*"
      layers: [5, 9]
      method: cat
    - match: "*.mlp.up_proj"
      method: cat
output:
  path: {output}
"""


def test_unused_rules_are_errors(tmp_path, sources):
    recipe = write_recipe(tmp_path / "recipe", UNUSED_RULE, sources)
    completed = run_cli("validate", str(recipe))

    assert completed.returncode == 1
    errors = completed.stderr.splitlines()
    assert len(errors) == 3
    assert errors[0].endswith(
        "rules.yaml:11:14: rule '*.o_proj' matches no included module (or an earlier rule takes them all): no source "
        "has a projection named 'o_proj' (did you mean 'v_proj'?); fix the pattern or remove the rule"
    )
    assert "rules.yaml:14:14: rule '*.self_attn.*' with layers [5, 9] matches no included module" in errors[1]
    assert "rules.yaml:17:14: rule '*.mlp.up_proj' matches no included module (or an earlier rule takes them all)" in errors[2]


def test_rule_rejects_unknown_parameter(tmp_path, sources):
    text = UNUSED_RULE.replace('      layers: [5, 9]\n      method: cat\n', '      method: cat\n      density: 0.3\n')
    recipe = write_recipe(tmp_path / "recipe", text, sources)
    completed = run_cli("validate", "--no-sources", str(recipe))

    assert completed.returncode == 1
    assert "rules.yaml:16:7: method 'cat' takes no 'density' (it takes no extra parameters); remove it" in completed.stderr


def test_merge_level_parameter_nobody_uses(tmp_path, sources):
    text = "version: 1\nsources:\n  - path: {a}\nmerge:\n  method: svd\n  rank: 4\n  density: 0.3\noutput:\n  path: {output}\n"
    recipe = write_recipe(tmp_path / "recipe", text, sources)
    completed = run_cli("validate", "--no-sources", str(recipe))

    assert completed.returncode == 1
    assert "rules.yaml:7:3: merge.density is set but no method this manifest uses (svd) takes it; remove it" in completed.stderr


def test_merge_level_parameter_used_by_rule(tmp_path, sources):
    text = (
        "version: 1\nsources:\n  - path: {a}\n  - path: {b}\nmerge:\n  method: svd\n  rank: 4\n  density: 0.3\n"
        "  rules:\n    - match: '*.mlp.*'\n      method: magnitude_prune\noutput:\n  path: {output}\n"
    )
    recipe = write_recipe(tmp_path / "recipe", text, sources)
    completed = run_cli("plan", str(recipe), "--device", "cpu", "--json")

    assert completed.returncode == 0, completed.stderr
    methods = {group["chosen_by"]: group["method"] for group in json.loads(completed.stdout)["groups"]}
    assert methods["merge.rules[0]"] == {"method": "magnitude_prune", "rank": 4, "density": 0.3}
    assert methods["merge"] == {"method": "svd", "rank": 4}


def test_schema_method_enum_lists_registry():
    schema = load_schema()

    assert schema["$defs"]["method"]["enum"] == method_names()
