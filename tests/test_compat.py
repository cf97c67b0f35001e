"""Merged outputs load with PEFT and with transformers' load_adapter, and pass verify."""

from __future__ import annotations

import copy
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from conftest import make_adapter, peft_deltas, run_cli, tiny_llama, write_manifest
from packaging.version import Version
from peft import PeftModel
from transformers.integrations.peft import MIN_PEFT_VERSION

# transformers raises in load_adapter below its minimum PEFT version (0.22.0 in transformers 5.25.0).
needs_compatible_peft = pytest.mark.skipif(
    Version(version("peft")) < Version(MIN_PEFT_VERSION),
    reason=f"transformers {version('transformers')} needs peft >= {MIN_PEFT_VERSION} for load_adapter; "
    f"peft {version('peft')} is installed",
)


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A cat merge of two rank-4 adapters whose layer 0 is block-merged to rank 2, run by the CLI."""
    root = tmp_path_factory.mktemp("compat")
    base = tiny_llama()
    first = make_adapter(base, root / "adapters" / "a", seed=11, r=4, alpha=8)
    second = make_adapter(base, root / "adapters" / "b", seed=12, r=4, alpha=8)
    manifest = write_manifest(
        root / "manifests",
        {
            "version": 1,
            "sources": [{"path": "../adapters/a"}, {"path": "../adapters/b", "weight": 0.5}],
            "merge": {"method": "cat", "rules": [{"match": "model.layers.0.*", "method": "block", "rank": 2}]},
            "output": {"path": "../output/mixed"},
        },
    )
    result = run_cli("run", str(manifest), "--no-progress")
    assert result.returncode == 0, result.stderr
    return root / "output" / "mixed", first, second


def test_output_loads_with_peft(merged: tuple[Path, Path, Path]) -> None:
    output, first, second = merged
    base = tiny_llama()

    deltas = peft_deltas(base, output)
    first_deltas, second_deltas = peft_deltas(base, first), peft_deltas(base, second)

    assert set(deltas) == set(first_deltas)
    for path, delta in deltas.items():
        if path.startswith("model.layers.1."):
            # cat is exact: ΔW = ΔW_a + 0.5 ΔW_b.
            torch.testing.assert_close(delta, first_deltas[path] + 0.5 * second_deltas[path], rtol=1e-5, atol=1e-6)
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(output))
    ranks = {name: module.r["default"] for name, module in model.named_modules() if hasattr(module, "r") and "default" in module.r}
    assert {rank for name, rank in ranks.items() if ".layers.0." in name} == {2}
    assert {rank for name, rank in ranks.items() if ".layers.1." in name} == {8}


@needs_compatible_peft
def test_output_loads_with_transformers_load_adapter(merged: tuple[Path, Path, Path]) -> None:
    output, _, _ = merged
    tokens = torch.arange(12).reshape(1, 12)
    base = tiny_llama()
    with torch.no_grad():
        expected = PeftModel.from_pretrained(copy.deepcopy(base), str(output)).eval()(tokens).logits
        plain = base(tokens).logits

    model = tiny_llama()
    model.load_adapter(str(output), adapter_name="merged")
    with torch.no_grad():
        logits = model.eval()(tokens).logits

    assert model.active_adapters() == ["merged"]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, plain, atol=1e-4)


def test_loadable_output_passes_verify(merged: tuple[Path, Path, Path]) -> None:
    output, _, _ = merged

    result = run_cli("verify", str(output))

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{output}: ok, 3 files match provenance.json"
