"""The README.md model card in every output folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import make_adapter, tiny_llama, write_manifest

from lorakit.execute import run_plan
from lorakit.manifest import load_manifest
from lorakit.modelcard import _fenced
from lorakit.plan import build_plan
from lorakit.provenance import file_sha256


def _set_base_model(folder: Path, name: str) -> None:
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = name
    config_path.write_text(json.dumps(config, indent=2))


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    header, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(header)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("card")
    base = tiny_llama()
    for name, seed in (("a", 1), ("b", 2)):
        make_adapter(base, root / "adapters" / name, seed=seed, r=4, alpha=8)
        _set_base_model(root / "adapters" / name, "example-org/tiny-llama")
    return root


def _run(project: Path, body: dict, name: str) -> Path:
    manifest = write_manifest(project / "manifests", body, name=f"{name}.yaml")
    plan = build_plan(load_manifest(manifest), device="cpu")
    run_plan(plan, force=True, progress=False)
    return project / "output" / name


def _body(name: str, **merge) -> dict:
    return {
        "version": 1,
        "description": "Two seeds of one recipe.",
        "sources": [{"path": "../adapters/a"}, {"path": "../adapters/b", "weight": 0.5}],
        "merge": merge,
        "output": {"path": f"../output/{name}"},
    }


def test_card_front_matter(project: Path) -> None:
    output = _run(project, _body("mixed", method="block", rank=6, projections={"v_proj": "cat"}), "mixed")

    front = _front_matter((output / "README.md").read_text())

    assert front["library_name"] == "peft"
    assert front["base_model"] == "example-org/tiny-llama"
    assert front["tags"][:2] == ["lorakit", "merge"]
    assert {"block", "cat"} <= set(front["tags"])


def test_card_body(project: Path) -> None:
    output = _run(project, _body("block", method="block", rank=6), "block")
    card = (output / "README.md").read_text()
    record = json.loads((output / "provenance.json").read_text())
    manifest_text = (project / "manifests" / "block.yaml").read_text()

    assert "# block\n\nTwo seeds of one recipe." in card
    assert _fenced(manifest_text, "yaml") in card
    for source in record["sources"]:
        for name, digest in source["files"].items():
            assert f"| {name} | `{digest}` |" in card
    assert "| `../adapters/b` | 0.5 | adapter_model.safetensors |" in card
    assert f"| adapter_model.safetensors | `{record['files']['adapter_model.safetensors']}` |" in card
    assert "PeftModel.from_pretrained(base, \"path/to/block\")" in card
    assert 'AutoModelForCausalLM.from_pretrained("example-org/tiny-llama")' in card
    assert "`--max-lora-rank 8`" in card
    assert str(project) not in card


def test_card_is_hashed_in_provenance(project: Path) -> None:
    output = _run(project, _body("hashed", method="cat"), "hashed")

    record = json.loads((output / "provenance.json").read_text())

    assert record["files"]["README.md"] == file_sha256(output / "README.md")


def test_card_is_reproducible(project: Path) -> None:
    first = (_run(project, _body("again", method="cat"), "again") / "README.md").read_bytes()
    second = (_run(project, _body("again", method="cat"), "again") / "README.md").read_bytes()

    assert first == second


def test_card_local_base_model_left_out(project: Path, tmp_path: Path) -> None:
    base = tiny_llama()
    for name, seed in (("c", 3), ("d", 4)):
        make_adapter(base, tmp_path / "adapters" / name, seed=seed)
        _set_base_model(tmp_path / "adapters" / name, "/models/llama")
    manifest = write_manifest(
        tmp_path / "manifests",
        {"version": 1, "sources": [{"path": "../adapters/c"}, {"path": "../adapters/d"}], "merge": {"method": "cat"}, "output": {"path": "../out"}},
    )
    run_plan(build_plan(load_manifest(manifest), device="cpu"), progress=False)

    card = (tmp_path / "out" / "README.md").read_text()

    assert "base_model" not in _front_matter(card)
    assert "Base model: `/models/llama`." in card


def test_fenced_outlasts_backticks_inside() -> None:
    text = "description: uses ```code``` and ````more````\n"

    fenced = _fenced(text, "yaml")

    assert fenced.startswith("`````yaml\n")
    assert fenced.endswith("\n`````")
