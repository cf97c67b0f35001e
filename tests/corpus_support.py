"""Helpers shared by the corpus, output-safety and fuzz tests: the corpus adapters and disk checks."""

from __future__ import annotations

import hashlib
from pathlib import Path

from conftest import make_adapter

CORPUS = Path(__file__).parent / "corpus"
MANIFESTS = sorted((CORPUS / "manifests").glob("*.yaml"))
VALID = sorted((CORPUS / "valid").glob("*.yaml"))


def build_corpus_root(base, root: Path) -> Path:
    """Create ``root/adapters`` as described in tests/corpus/README.md and an empty ``root/recipes``."""
    adapters = root / "adapters"
    make_adapter(base, adapters / "a", seed=1)
    make_adapter(base, adapters / "b", seed=2)
    make_adapter(base, adapters / "c", seed=3, r=8, alpha=16)
    make_adapter(base, adapters / "mts", seed=4, modules_to_save=["lm_head"])
    (adapters / "not-an-adapter").mkdir()
    (adapters / "not-an-adapter" / "README.txt").write_text("not an adapter\n")
    (adapters / "file.txt").write_text("a plain file\n")
    (root / "recipes").mkdir()
    return root


def tree_digest(folder: Path) -> dict[str, str]:
    """Return relative path → sha256 (or "folder") for everything under ``folder``."""
    digest = {}
    for path in sorted(folder.rglob("*")):
        relative = str(path.relative_to(folder))
        digest[relative] = "folder" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def leftovers(folder: Path) -> list[str]:
    """Return the temporary folders, backups and lock files lorakit made anywhere under ``folder``."""
    return sorted(str(path) for path in folder.rglob("*") if ".lorakit-" in path.name)
