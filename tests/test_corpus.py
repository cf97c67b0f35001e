"""The bad-input corpus through the real CLI: broken manifests and hostile adapters.

Every case runs ``lorakit run`` and ``lorakit validate`` in its own process (see
``forked_cli.py``) and must end with the expected exit code, one message holding the expected
fragments, no traceback, no output folder, no temporary folder and unchanged inputs.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from peft import AdaLoraConfig, IA3Config, LoHaConfig, LoKrConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from conftest import make_adapter, write_manifest
from corpus_support import CORPUS, MANIFESTS, VALID, build_corpus_root, leftovers, tree_digest
from forked_cli import CliResult, run_cli_batch

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def corpus_root(base_model, tmp_path_factory) -> Path:
    """The adapters every corpus manifest can name, built once per module."""
    return build_corpus_root(base_model, tmp_path_factory.mktemp("corpus"))


# ---------------------------------------------------------------------------------------------
# Checks shared by every failing case.


def check_failure(result: CliResult, code: int, fragments: list[str], command: str) -> None:
    assert result.returncode == code, f"{command}: exit {result.returncode}, expected {code}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, f"{command}: {fragment!r} not in stderr:\n{result.stderr}"
    if command == "run":
        assert result.stdout == ""
        assert result.stderr.startswith("error:"), result.stderr
        # One message: the "error:" line and, for several manifest problems, one line per problem.
        assert result.stderr.count("error:") == 1, result.stderr


# ---------------------------------------------------------------------------------------------
# Invalid manifests: tests/corpus/manifests/*.yaml, expectations in their header comments.


@dataclass(frozen=True)
class Expectation:
    exit_code: int
    validate_exit_code: int
    fragments: list[str]
    lines: int | None


def read_expectation(path: Path) -> Expectation:
    header = path.read_bytes().decode("latin-1").splitlines()
    exit_code = validate_exit = lines = None
    fragments = []
    for line in header:
        if not line.startswith("# expect"):
            continue
        key, _, value = line[2:].partition(": ")
        if key == "expect-exit":
            exit_code = int(value)
        elif key == "expect-validate-exit":
            validate_exit = int(value)
        elif key == "expect-lines":
            lines = int(value)
        elif key == "expect":
            fragments.append(value)
    assert exit_code is not None and fragments, f"{path.name} states no expect-exit or expect line"
    return Expectation(exit_code, exit_code if validate_exit is None else validate_exit, fragments, lines)


def test_corpus_has_enough_cases():
    assert len(MANIFESTS) >= 40
    assert len(HOSTILE) >= 15


@pytest.fixture(scope="module")
def manifest_runs(corpus_root) -> dict[str, tuple[CliResult, CliResult]]:
    """Run every corpus manifest (run, then validate) and every valid one, in one batch."""
    recipes = corpus_root / "recipes"
    for path in MANIFESTS + VALID:
        shutil.copyfile(path, recipes / path.name)
    before = tree_digest(corpus_root)

    commands = []
    for path in MANIFESTS:
        commands.append(["run", "--device", "cpu", "--no-progress", str(recipes / path.name)])
        commands.append(["validate", str(recipes / path.name)])
    results = run_cli_batch(commands, corpus_root.parent / f"{corpus_root.name}-logs")

    after = tree_digest(corpus_root)
    assert after == before, "a failing run created, changed or removed files"
    return {path.name: (results[2 * i], results[2 * i + 1]) for i, path in enumerate(MANIFESTS)}


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda path: path.stem)
def test_corpus_manifest(manifest, manifest_runs, corpus_root):
    expected = read_expectation(manifest)
    copied = corpus_root / "recipes" / manifest.name
    fragments = [
        fragment.replace("{file}", str(copied))
        .replace("{adapters}", str(corpus_root / "adapters"))
        .replace("{root}", str(corpus_root))
        for fragment in expected.fragments
    ]
    run, validate = manifest_runs[manifest.name]

    check_failure(run, expected.exit_code, fragments, "run")
    check_failure(validate, expected.validate_exit_code, fragments, "validate")
    if expected.lines is not None:
        assert len(run.stderr.splitlines()) == expected.lines, run.stderr
    assert not (corpus_root / "output").exists()
    assert leftovers(corpus_root) == []


def test_corpus_valid_manifests_run(corpus_root):
    recipes = corpus_root / "recipes"
    commands = []
    for path in VALID:
        shutil.copyfile(path, recipes / path.name)
        commands.append(["run", "--device", "cpu", "--no-progress", str(recipes / path.name)])
    results = run_cli_batch(commands, corpus_root.parent / f"{corpus_root.name}-valid-logs")
    try:
        for path, result in zip(VALID, results):
            assert result.returncode == 0, f"{path.name}: {result.stderr}"
            # The corpus adapters are tiny, so some ranks exceed a dense delta's size, which plan rightly warns about.
            other = [line for line in result.stderr.splitlines() if "are at least as large as the dense" not in line]
            assert other == [], f"{path.name}: {result.stderr}"
        assert leftovers(corpus_root) == []
    finally:
        shutil.rmtree(corpus_root / "output", ignore_errors=True)


def test_corpus_verbose_shows_traceback(corpus_root):
    recipe = corpus_root / "recipes" / "verbose.yaml"
    shutil.copyfile(CORPUS / "manifests" / "rank-zero.yaml", recipe)
    quiet, verbose = run_cli_batch(
        [["run", str(recipe)], ["-v", "run", str(recipe)]], corpus_root.parent / f"{corpus_root.name}-verbose"
    )
    assert quiet.returncode == verbose.returncode == 1
    assert "Traceback" not in quiet.stderr
    assert "Traceback" in verbose.stderr
    assert "ManifestError" in verbose.stderr


# ---------------------------------------------------------------------------------------------
# Hostile adapters: real PEFT adapters, corrupted after saving.


def edit_config(folder: Path, **changes) -> None:
    path = folder / CONFIG
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))


def edit_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = folder / WEIGHTS
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), {"format": "pt"})


def first_key(tensors: dict[str, torch.Tensor], suffix: str) -> str:
    return sorted(key for key in tensors if key.endswith(suffix))[0]


FIRST_MODULE = "model.layers.0.mlp.down_proj"


def peft_adapter(config_factory) -> Callable[[LlamaForCausalLM, Path], None]:
    def make(base: LlamaForCausalLM, folder: Path) -> None:
        model = get_peft_model(copy.deepcopy(base), config_factory())
        model.save_pretrained(str(folder))

    return make


def with_good(edit: Callable[[Path], None]) -> Callable[[LlamaForCausalLM, Path], None]:
    def make(base: LlamaForCausalLM, folder: Path) -> None:
        make_adapter(base, folder, seed=7)
        edit(folder)

    return make


def set_value(suffix: str, value: float) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        def change(tensors):
            key = first_key(tensors, suffix)
            tensors[key][0, 0] = value

        edit_tensors(folder, change)

    return edit


def rewrite_weights(transform: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / WEIGHTS
        path.write_bytes(transform(path.read_bytes()))

    return edit


class MarkerOnLoad:
    """Unpickling this object calls ``open(marker, "w")``, creating the marker file: code execution."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def hostile_pickle(folder: Path, marker: Path) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    payload = dict(tensors)
    payload["base_model.model.payload"] = MarkerOnLoad(marker)
    torch.save(payload, folder / "adapter_model.bin")


def replace_with_pickle(folder: Path) -> None:
    hostile_pickle(folder, folder.parent / f"{folder.name}.marker")
    (folder / WEIGHTS).unlink()


def add_pickle(folder: Path) -> None:
    hostile_pickle(folder, folder.parent / f"{folder.name}.marker")


def other_base(base: LlamaForCausalLM, folder: Path) -> None:
    config = copy.deepcopy(base.config)
    config.intermediate_size = 64
    torch.manual_seed(0)
    make_adapter(LlamaForCausalLM(config).eval(), folder, seed=8)


def lokr_keys_under_lora_config(base: LlamaForCausalLM, folder: Path) -> None:
    peft_adapter(lambda: LoKrConfig(target_modules=["q_proj"], r=4))(base, folder)
    good_config = folder.parent / "lokr-good-config"
    make_adapter(base, good_config, seed=9)
    shutil.copyfile(good_config / CONFIG, folder / CONFIG)
    shutil.rmtree(good_config)


def drop_key(suffix: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        edit_tensors(folder, lambda tensors: tensors.pop(first_key(tensors, suffix)))

    return edit


def retype(suffix: str, dtype: torch.dtype) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        def change(tensors):
            key = first_key(tensors, suffix)
            tensors[key] = tensors[key].to(dtype)

        edit_tensors(folder, change)

    return edit


def flatten_first_a(folder: Path) -> None:
    def change(tensors):
        key = first_key(tensors, "lora_A.weight")
        tensors[key] = tensors[key].reshape(-1)

    edit_tensors(folder, change)


def make_folder_of(name: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        (folder / name).unlink()
        (folder / name).mkdir()

    return edit


@dataclass(frozen=True)
class HostileCase:
    """One hostile adapter: how to make it, and what ``run`` and ``validate`` must do with it."""

    name: str
    make: Callable[[LlamaForCausalLM, Path], None]
    exit_code: int
    fragments: list[str]
    validate_exit_code: int | None = None
    verbose_fragments: list[str] = field(default_factory=list)


HOSTILE = [
    HostileCase("config-missing", with_good(lambda f: (f / CONFIG).unlink()), 1, ["{adapter}/adapter_config.json: not found; a PEFT adapter folder contains adapter_config.json"]),
    HostileCase(
        "config-invalid-json",
        with_good(lambda f: (f / CONFIG).write_text('{"peft_type": "LORA",\n  "r": 4,,\n}')),
        1,
        ["{adapter}/adapter_config.json:2:10: invalid JSON"],
    ),
    HostileCase("config-not-object", with_good(lambda f: (f / CONFIG).write_text("[1, 2]")), 1, ["adapter_config.json: expected a JSON object"]),
    HostileCase("config-is-folder", with_good(make_folder_of(CONFIG)), 2, ["{adapter}/adapter_config.json", "is a folder"]),
    HostileCase("config-r-missing", with_good(lambda f: edit_config(f, r=None)), 1, ["adapter_config.json: r must be a positive integer, got None"]),
    HostileCase("config-r-zero", with_good(lambda f: edit_config(f, r=0)), 1, ["r must be a positive integer, got 0"]),
    HostileCase("config-alpha-string", with_good(lambda f: edit_config(f, lora_alpha="8")), 1, ["lora_alpha must be a positive number, got '8'"]),
    HostileCase("config-rank-pattern-list", with_good(lambda f: edit_config(f, rank_pattern=["q_proj"])), 1, ["rank_pattern must be a mapping"]),
    HostileCase(
        "config-rank-pattern-bad-regex",
        with_good(lambda f: edit_config(f, rank_pattern={"q_proj(": 8})),
        1,
        ["rank_pattern key 'q_proj(' is not a valid regular expression"],
    ),
    HostileCase(
        "config-alpha-pattern-string",
        with_good(lambda f: edit_config(f, alpha_pattern={"q_proj": "16"})),
        1,
        ["alpha_pattern['q_proj'] must be a positive number, got '16'"],
    ),
    HostileCase(
        "config-alpha-nan",
        with_good(lambda f: (f / CONFIG).write_text((f / CONFIG).read_text().replace('"lora_alpha": 8', '"lora_alpha": NaN'))),
        1,
        ["lora_alpha must be a positive number, got nan"],
    ),
    HostileCase(
        "config-modules-to-save-string",
        with_good(lambda f: edit_config(f, modules_to_save="lm_head")),
        1,
        ["modules_to_save must be a list of module names, got 'lm_head'"],
    ),
    HostileCase(
        "config-rank-disagrees",
        with_good(lambda f: edit_config(f, r=8)),
        1,
        [f"module {FIRST_MODULE!r} has rank 4 in its tensors but 8 in", "adapter_config.json"],
    ),
    HostileCase("peft-type-missing", with_good(lambda f: edit_config(f, peft_type=None)), 1, ["peft_type is None"]),
    HostileCase(
        "adalora",
        peft_adapter(lambda: AdaLoraConfig(target_modules=["q_proj"], total_step=10, init_r=4)),
        1,
        ["peft_type is 'ADALORA'", 'peft_type "LORA"'],
    ),
    HostileCase("ia3", peft_adapter(lambda: IA3Config(target_modules=["q_proj"], feedforward_modules=[])), 1, ["peft_type is 'IA3'"]),
    HostileCase("loha", peft_adapter(lambda: LoHaConfig(target_modules=["q_proj"], r=4)), 1, ["peft_type is 'LOHA'"]),
    HostileCase("lokr-keys-in-lora-config", lokr_keys_under_lora_config, 1, ["lokr_w1", "LoKr"]),
    HostileCase("dora-config", lambda base, f: make_adapter(base, f, seed=7, use_dora=True), 1, ["use_dora is true", "base weights"]),
    HostileCase(
        "dora-tensors",
        lambda base, f: (make_adapter(base, f, seed=7, use_dora=True), edit_config(f, use_dora=False)),
        1,
        ["lora_magnitude_vector", "DoRA", "base weights"],
    ),
    HostileCase("lora-bias-config", lambda base, f: make_adapter(base, f, seed=7, lora_bias=True), 1, ["lora_bias is true"]),
    HostileCase(
        "lora-bias-tensors",
        lambda base, f: (make_adapter(base, f, seed=7, lora_bias=True), edit_config(f, lora_bias=False)),
        1,
        ["lora_B.bias", "bias"],
    ),
    HostileCase(
        "modules-to-save",
        lambda base, f: make_adapter(base, f, seed=7, modules_to_save=["lm_head"]),
        1,
        ["base_model.model.lm_head.weight", "merge.modules_to_save: {source: hostile}"],
    ),
    HostileCase(
        "lora-a-without-b",
        with_good(drop_key("lora_B.weight")),
        1,
        [f"module {FIRST_MODULE!r} has a lora_A tensor but no lora_B tensor; the file is incomplete"],
    ),
    HostileCase(
        "lora-b-without-a",
        with_good(drop_key("lora_A.weight")),
        1,
        [f"module {FIRST_MODULE!r} has a lora_B tensor but no lora_A tensor"],
    ),
    HostileCase(
        "lora-a-one-dimensional",
        with_good(flatten_first_a),
        1,
        [f"module {FIRST_MODULE!r} has lora_A [192] and lora_B [32, 4], which do not form a low-rank pair"],
    ),
    HostileCase("factor-dtypes-differ", with_good(retype("lora_B.weight", torch.float16)), 1, ["stores lora_A as torch.float32 and lora_B as torch.float16"]),
    HostileCase("factor-integer-dtype", with_good(retype("lora_B.weight", torch.int8)), 1, ["has dtype I8"]),
    HostileCase(
        "other-base-shapes",
        other_base,
        1,
        [
            "source 'hostile': module 'model.layers.0.mlp.down_proj' has lora_A [4, 64] / lora_B [32, 4] but "
            "source 'a' has [4, 48] / [32, 4]; the sources were trained on different base models"
        ],
    ),
    HostileCase(
        "other-modules",
        lambda base, f: make_adapter(base, f, seed=7, targets=["q_proj", "v_proj"]),
        1,
        ["source 'hostile' adapts other modules than source 'a' (6 differ, such as 'model.layers.0.mlp.down_proj'"],
    ),
    HostileCase(
        "nan-in-lora-a",
        with_good(set_value("lora_A.weight", float("nan"))),
        1,
        ["{adapter}/adapter_model.safetensors: module 'model.layers.0.mlp.down_proj' has NaN or Inf values in lora_A"],
        validate_exit_code=0,
    ),
    HostileCase(
        "inf-in-lora-b",
        with_good(set_value("lora_B.weight", float("-inf"))),
        1,
        ["module 'model.layers.0.mlp.down_proj' has NaN or Inf values in lora_B"],
        validate_exit_code=0,
    ),
    HostileCase("safetensors-empty", with_good(rewrite_weights(lambda data: b"")), 1, ["adapter_model.safetensors: invalid safetensors file", "header too small"]),
    HostileCase(
        "safetensors-truncated",
        with_good(rewrite_weights(lambda data: data[: len(data) // 2])),
        1,
        ["invalid safetensors file", "incomplete metadata"],
    ),
    HostileCase(
        "safetensors-header-corrupt",
        with_good(rewrite_weights(lambda data: data[:8] + b"#" + data[9:])),
        1,
        ["invalid safetensors file", "invalid JSON in header"],
    ),
    HostileCase(
        "safetensors-header-length-huge",
        with_good(rewrite_weights(lambda data: (2**60).to_bytes(8, "little") + data[8:])),
        1,
        ["invalid safetensors file", "header too large"],
    ),
    HostileCase("safetensors-is-folder", with_good(make_folder_of(WEIGHTS)), 2, ["{adapter}/adapter_model.safetensors", "is a folder"]),
    HostileCase("weights-missing", with_good(lambda f: (f / WEIGHTS).unlink()), 1, ["no adapter_model.safetensors or adapter_model.bin"]),
    HostileCase(
        "pickle-runs-code",
        with_good(replace_with_pickle),
        1,
        [
            "{adapter}/adapter_model.bin: not a loadable PyTorch state dict (UnpicklingError: Unsupported global: "
            "GLOBAL io.open was not an allowed global by default)",
            "convert the adapter to safetensors",
        ],
    ),
]

# Folders that must work: a hostile pickle beside the safetensors file is never read, and a
# PEFT .bin adapter loads with weights_only.
BENIGN = [
    HostileCase("bin-and-safetensors", with_good(add_pickle), 0, [], verbose_fragments=["reading adapter_model.safetensors"]),
    HostileCase("bin-only", lambda base, f: make_adapter(base, f, seed=7, save_format="bin"), 0, []),
]


@pytest.fixture(scope="module")
def hostile_runs(base_model, tmp_path_factory) -> tuple[Path, dict[str, tuple[CliResult, CliResult]]]:
    """Build every hostile adapter and run ``run`` and ``validate`` on a manifest naming it."""
    root = tmp_path_factory.mktemp("hostile")
    make_adapter(base_model, root / "adapters" / "a", seed=1)
    for case in HOSTILE + BENIGN:
        folder = root / "hostile" / case.name
        folder.parent.mkdir(exist_ok=True)
        case.make(base_model, folder)
        body = {
            "version": 1,
            "sources": [{"path": "../adapters/a"}, {"path": f"../hostile/{case.name}", "name": "hostile"}],
            "merge": {"method": "cat"},
            # Two missing parent folders, which a failed run must remove again.
            "output": {"path": f"../output/{case.name}/nested/out"},
        }
        write_manifest(root / "recipes", body, name=f"{case.name}.yaml")
    before = tree_digest(root)

    commands = []
    for case in HOSTILE + BENIGN:
        recipe = str(root / "recipes" / f"{case.name}.yaml")
        # Failing runs keep the progress bar on: off a terminal it must stay out of the message.
        commands.append(["-v", "run", "--device", "cpu", "--no-progress", recipe] if case.exit_code == 0 else ["run", "--device", "cpu", recipe])
        commands.append(["validate", recipe])
    results = run_cli_batch(commands, root.parent / f"{root.name}-logs")

    after = tree_digest(root)
    written = {path for path in after if path.startswith("output")}
    assert {path: value for path, value in after.items() if path not in written} == before
    return root, {case.name: (results[2 * i], results[2 * i + 1]) for i, case in enumerate(HOSTILE + BENIGN)}


@pytest.mark.parametrize("case", HOSTILE, ids=lambda case: case.name)
def test_hostile_adapter(case, hostile_runs):
    root, results = hostile_runs
    run, validate = results[case.name]
    adapter = root / "hostile" / case.name
    recipe = root / "recipes" / f"{case.name}.yaml"
    fragments = [fragment.replace("{adapter}", str(adapter)) for fragment in case.fragments]

    check_failure(run, case.exit_code, fragments, "run")
    if case.validate_exit_code == 0:
        assert validate.returncode == 0, validate.stderr
    else:
        check_failure(validate, case.exit_code, fragments, "validate")
    if case.validate_exit_code is None:
        # Found while planning, so the message points at the manifest line naming the source.
        assert f"{recipe}:8:15: source 'hostile'" in run.stderr
    assert not (root / "output" / case.name).exists()
    assert leftovers(root) == []
    assert not (root / "hostile" / f"{case.name}.marker").exists(), "unpickling ran code"


@pytest.mark.parametrize("case", BENIGN, ids=lambda case: case.name)
def test_benign_adapter(case, hostile_runs):
    root, results = hostile_runs
    run, validate = results[case.name]
    assert run.returncode == 0, run.stderr
    assert validate.returncode == 0, validate.stderr
    for fragment in case.verbose_fragments:
        assert fragment in run.stderr
    assert (root / "output" / case.name / "nested" / "out" / WEIGHTS).is_file()
    assert not (root / "hostile" / f"{case.name}.marker").exists(), "unpickling ran code"


def test_hostile_pickle_payload_runs_code_when_unsafe(tmp_path):
    """The payload is real: plain unpickling creates the marker, so the tests above can fail."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file({"base_model.model.x.lora_A.weight": torch.ones(1, 2)}, str(folder / WEIGHTS))
    marker = tmp_path / "marker"
    hostile_pickle(folder, marker)
    torch.load(folder / "adapter_model.bin", weights_only=False)
    assert marker.exists()
