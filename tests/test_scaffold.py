"""lorakit init: a commented, valid manifest with relative paths and the schema modeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import make_adapter, run_cli, tiny_llama

from lorakit.errors import LorakitError, ManifestError
from lorakit.manifest import load_manifest
from lorakit.scaffold import scaffold_manifest, write_scaffold
from lorakit.schema import load_schema


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder with adapters/run1/seed100, adapters/run2/seed100 and adapters/seed200."""
    root = tmp_path_factory.mktemp("project")
    base = tiny_llama()
    make_adapter(base, root / "adapters" / "run1" / "seed100", seed=1, r=4, alpha=8)
    make_adapter(base, root / "adapters" / "run2" / "seed100", seed=2, r=4, alpha=8)
    make_adapter(base, root / "adapters" / "seed200", seed=3, r=8, alpha=16)
    return root


def test_init_cli_writes_valid_manifest(adapters: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "recipes" / "manifests" / "block64.yaml"
    sources = [str(adapters / "adapters" / "run1" / "seed100"), str(adapters / "adapters" / "seed200")]

    result = run_cli("init", *sources, "--method", "block", "--rank", "12", "-o", str(manifest))
    validated = run_cli("validate", str(manifest))

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(manifest), str(manifest.parent / "manifest.schema.json")]
    assert validated.returncode == 0, validated.stderr
    text = manifest.read_text()
    assert text.splitlines()[0] == "# yaml-language-server: $schema=manifest.schema.json"
    assert json.loads((manifest.parent / "manifest.schema.json").read_text()) == load_schema()
    data = yaml.safe_load(text)
    assert data["name"] == "block64"
    assert data["merge"] == {"method": "block", "rank": 12}
    assert data["output"] == {"path": "../output/block64", "dtype": "source"}
    relative = [entry["path"] for entry in data["sources"]]
    assert all(not Path(path).is_absolute() for path in relative)
    assert [(manifest.parent / path).resolve() for path in relative] == [Path(path).resolve() for path in sources]


def test_init_manifest_is_commented(adapters: Path, tmp_path: Path) -> None:
    scaffold = scaffold_manifest([adapters / "adapters" / "seed200"], "cat", output=tmp_path / "m" / "cat.yaml")

    comments = [line for line in scaffold.text.splitlines() if line.lstrip().startswith("#")]
    assert "  # include: [down_proj, up_proj, k_proj, q_proj, v_proj]" in comments
    assert "  # projections:" in comments
    assert "name: \"seed200\"  # r=8, lora_alpha=16, 10 modules" in scaffold.text
    assert "  method: cat  # concatenate every component" in scaffold.text


def test_init_colliding_folder_names(adapters: Path, tmp_path: Path) -> None:
    folders = [adapters / "adapters" / "run1" / "seed100", adapters / "adapters" / "run2" / "seed100"]

    scaffold = scaffold_manifest(folders, "cat", output=tmp_path / "m" / "both.yaml")

    names = [entry["name"] for entry in yaml.safe_load(scaffold.text)["sources"]]
    assert names == ["run1-seed100", "run2-seed100"]


def test_init_random_method_gets_seeds(adapters: Path, tmp_path: Path) -> None:
    folders = [adapters / "adapters" / "run1" / "seed100", adapters / "adapters" / "run2" / "seed100"]

    default = scaffold_manifest(folders, "random", rank=4, output=tmp_path / "m" / "r.yaml")
    chosen = scaffold_manifest(folders, "random", rank=4, seeds=[5, 6], output=tmp_path / "m" / "r.yaml")

    assert yaml.safe_load(default.text)["seeds"] == [0]
    assert yaml.safe_load(chosen.text)["seeds"] == [5, 6]


def test_init_stdout_paths_relative_to_cwd(adapters: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()

    result = run_cli("init", str(adapters / "adapters" / "seed200"), "--method", "cat", cwd=work)

    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    assert (work / data["sources"][0]["path"]).resolve() == (adapters / "adapters" / "seed200").resolve()
    assert list(work.iterdir()) == []


def test_init_rank_too_large_writes_nothing(adapters: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "new" / "manifests" / "big.yaml"

    result = run_cli("init", str(adapters / "adapters" / "seed200"), "--method", "block", "--rank", "64", "-o", str(manifest))

    assert result.returncode == 1
    assert f"{manifest}:" in result.stderr
    assert "block rank 64 exceeds the 8 components" in result.stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("method", "rank", "params", "message"),
    [
        ("block", None, {}, "needs a target rank; pass --rank"),
        ("cat", 8, {}, "takes no rank"),
        ("cat", None, {"density": 0.3}, "takes no parameter 'density'"),
    ],
)
def test_init_rejects_options(adapters: Path, tmp_path: Path, method: str, rank: int | None, params: dict, message: str) -> None:
    with pytest.raises(LorakitError, match=message):
        scaffold_manifest([adapters / "adapters" / "seed200"], method, rank=rank, params=params, output=tmp_path / "m.yaml")


def test_init_existing_manifest_needs_force(adapters: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "manifests" / "cat.yaml"
    scaffold = scaffold_manifest([adapters / "adapters" / "seed200"], "cat", output=manifest)
    write_scaffold(scaffold)
    manifest.write_text("edited by hand\n")

    with pytest.raises(LorakitError, match="already exists; pass --force"):
        write_scaffold(scaffold)
    assert manifest.read_text() == "edited by hand\n"
    assert write_scaffold(scaffold, force=True) == [manifest]
    assert load_manifest(manifest).name == "cat"


def test_init_schema_url_writes_no_schema(adapters: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "manifests" / "cat.yaml"
    url = "https://example.org/lorakit/manifest.schema.json"

    scaffold = scaffold_manifest([adapters / "adapters" / "seed200"], "cat", output=manifest, schema_reference=url)

    assert write_scaffold(scaffold) == [manifest]
    assert manifest.read_text().startswith(f"# yaml-language-server: $schema={url}\n")


def test_init_output_path_inside_manifest_folder_fails(adapters: Path, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="overlaps the manifest's folder"):
        scaffold_manifest([adapters / "adapters" / "seed200"], "cat", output=tmp_path / "m" / "cat.yaml", output_path="out")
