"""Adapters that target embed_tokens, which PEFT saves with the base embedding weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_adapter, peft_deltas, run_cli, saved_tensors, write_manifest
from safetensors.torch import load_file, save_file

from lorakit.errors import AdapterError
from lorakit.execute import run_plan
from lorakit.manifest import load_manifest
from lorakit.plan import build_plan

BASE_KEY = "base_model.model.model.embed_tokens.base_layer.weight"
WEIGHTS = "adapter_model.safetensors"


def merge(root: Path, merge_section: dict, sources: tuple[str, ...] = ("a", "b")) -> Path:
    body = {
        "version": 1,
        "sources": [{"path": f"../{name}"} for name in sources],
        "merge": merge_section,
        "output": {"path": "../out"},
    }
    run_plan(build_plan(load_manifest(write_manifest(root / "recipes", body)), device="cpu"), progress=False)
    return root / "out"


def rewrite_weights(folder: Path, change) -> None:
    """Load an adapter's safetensors file, let ``change`` edit the dict, and save it back."""
    tensors = load_file(str(folder / WEIGHTS))
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})


@pytest.fixture()
def embedding_sources(base_model, tmp_path) -> list[Path]:
    return [make_adapter(base_model, tmp_path / name, seed, targets=["embed_tokens", "q_proj"]) for name, seed in (("a", 1), ("b", 2))]


def test_peft_saves_base_embedding(embedding_sources):
    assert BASE_KEY in saved_tensors(embedding_sources[0])


def test_block_copies_base_embedding(base_model, tmp_path, embedding_sources):
    output = merge(tmp_path, {"method": "block", "rank": 8})

    written = saved_tensors(output)
    assert torch.equal(written[BASE_KEY], saved_tensors(embedding_sources[0])[BASE_KEY])
    parts = [peft_deltas(base_model, folder) for folder in embedding_sources]
    expected = {path: (parts[0][path] + parts[1][path]) / 2 for path in parts[0]}
    actual = peft_deltas(base_model, output)
    assert sorted(actual) == sorted(expected)
    for path in expected:
        assert torch.allclose(actual[path], expected[path], atol=1e-6), path
    provenance = json.loads((output / "provenance.json").read_text())
    assert provenance["base_layers"] == [BASE_KEY]


def test_include_drops_base_embedding(tmp_path, embedding_sources):
    output = merge(tmp_path, {"method": "block", "rank": 8, "include": ["q_proj"]})

    written = saved_tensors(output)
    assert BASE_KEY not in written
    assert all("embed_tokens" not in key for key in written)


def test_different_base_embeddings_rejected(tmp_path, embedding_sources):
    def perturb(tensors: dict[str, torch.Tensor]) -> None:
        tensors[BASE_KEY][0, 0] += 1.0

    rewrite_weights(embedding_sources[1], perturb)

    with pytest.raises(AdapterError) as raised:
        merge(tmp_path, {"method": "block", "rank": 8})

    assert f"base embedding weights {BASE_KEY!r} differ from those of source 'a'" in str(raised.value)
    assert not (tmp_path / "out").exists()


def test_missing_base_embedding_rejected(tmp_path, embedding_sources):
    rewrite_weights(embedding_sources[1], lambda tensors: tensors.pop(BASE_KEY))
    manifest = write_manifest(
        tmp_path / "recipes",
        {
            "version": 1,
            "sources": [{"path": "../a"}, {"path": "../b"}],
            "merge": {"method": "block", "rank": 8},
            "output": {"path": "../out"},
        },
    )

    result = run_cli("plan", "--device", "cpu", str(manifest))

    assert result.returncode == 1, result.stderr
    assert "the base weights PEFT saved for embedding 'model.embed_tokens' are missing" in result.stderr
    assert "Traceback" not in result.stderr
