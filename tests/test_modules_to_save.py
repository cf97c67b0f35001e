"""merge.modules_to_save: full weights copied unchanged from one source, reloaded by PEFT."""

from __future__ import annotations

import copy
import json

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from conftest import make_adapter, peft_deltas, run_cli, saved_tensors, write_manifest

HEAD_KEY = "base_model.model.lm_head.weight"


def make_head_adapter(base, folder, seed):
    """A PEFT adapter with lm_head in modules_to_save, its head weights replaced by seeded noise.

    PEFT saves an untrained copy of the base head, so the noise makes each source's head unique.
    """
    make_adapter(base, folder, seed=seed, modules_to_save=["lm_head"])
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    generator = torch.Generator().manual_seed(1000 + seed)
    tensors[HEAD_KEY] = torch.randn(tensors[HEAD_KEY].shape, generator=generator)
    save_file(tensors, str(path), {"format": "pt"})
    return tensors[HEAD_KEY]


def test_modules_to_save_copied_and_reloaded(base_model, tmp_path):
    make_head_adapter(base_model, tmp_path / "s1", seed=1)
    head = make_head_adapter(base_model, tmp_path / "s2", seed=2)
    body = {
        "version": 1,
        "sources": [{"path": "../s1"}, {"path": "../s2"}],
        "merge": {"method": "cat", "modules_to_save": {"source": "s2"}},
        "output": {"path": "../out", "dtype": "float16"},
    }
    recipe = write_manifest(tmp_path / "recipes", body)

    planned = run_cli("plan", "--device", "cpu", str(recipe))
    result = run_cli("run", "--device", "cpu", "--no-progress", str(recipe))

    assert planned.returncode == 0, planned.stderr
    assert "copied    modules_to_save lm_head from s2 (1 tensors)" in planned.stdout
    assert result.returncode == 0, result.stderr
    assert "source 's1': its 1 modules_to_save tensor(s) are left out; the output copies those of source 's2'" in result.stderr

    out = tmp_path / "out"
    tensors = saved_tensors(out)
    # Copied unchanged: same bytes and dtype, although the LoRA factors are cast to float16.
    assert tensors[HEAD_KEY].dtype == torch.float32
    assert torch.equal(tensors[HEAD_KEY], head)
    assert all(tensor.dtype == torch.float16 for key, tensor in tensors.items() if key != HEAD_KEY)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"]
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["modules_to_save"] == {"source": "s2", "modules": ["lm_head"], "tensors": [HEAD_KEY]}
    assert provenance["manifest"]["normalised"]["merge"]["modules_to_save"] == {"source": "s2"}

    model = PeftModel.from_pretrained(copy.deepcopy(base_model), str(out))
    wrapper = model.base_model.model.lm_head
    assert torch.equal(wrapper.modules_to_save["default"].weight, head)
    merged = peft_deltas(base_model, out)
    first, second = peft_deltas(base_model, tmp_path / "s1"), peft_deltas(base_model, tmp_path / "s2")
    for path, delta in merged.items():
        # cat is exact up to the float16 rounding of the factors.
        torch.testing.assert_close(delta, first[path] + second[path], rtol=2e-2, atol=2e-3)


def test_modules_to_save_output_predicts_like_source(base_model, tmp_path):
    """The reloaded head is active: with zero LoRA weights the merged model's logits are the source's."""
    make_head_adapter(base_model, tmp_path / "s1", seed=1)
    body = {
        "version": 1,
        "sources": [{"path": "../s1", "weight": 0}],
        "merge": {"method": "cat", "modules_to_save": {"source": "s1"}},
        "output": {"path": "../out"},
    }
    recipe = write_manifest(tmp_path / "recipes", body)
    result = run_cli("run", "--device", "cpu", "--no-progress", str(recipe))
    assert result.returncode == 0, result.stderr

    tokens = torch.tensor([[1, 5, 9, 2]])
    source = PeftModel.from_pretrained(copy.deepcopy(base_model), str(tmp_path / "s1"))
    merged = PeftModel.from_pretrained(copy.deepcopy(base_model), str(tmp_path / "out"))
    with torch.no_grad(), source.disable_adapter():
        plain = source(tokens).logits
    with torch.no_grad():
        expected = torch.nn.functional.linear(base_model.model(tokens).last_hidden_state, source.base_model.model.lm_head.modules_to_save["default"].weight)
        logits = merged(tokens).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, plain)


def test_modules_to_save_nan_rejected(base_model, tmp_path):
    make_head_adapter(base_model, tmp_path / "s1", seed=1)
    path = tmp_path / "s1" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors[HEAD_KEY][3, 5] = float("nan")
    save_file(tensors, str(path), {"format": "pt"})
    body = {
        "version": 1,
        "sources": [{"path": "../s1"}],
        "merge": {"method": "cat", "modules_to_save": {"source": "s1"}},
        "output": {"path": "../out"},
    }
    recipe = write_manifest(tmp_path / "recipes", body)

    result = run_cli("run", "--device", "cpu", "--no-progress", str(recipe))

    assert result.returncode == 1, result.stderr
    assert f"modules_to_save tensor {HEAD_KEY!r} has NaN or Inf values; the adapter is corrupt" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
