"""The provenance record written beside every output: enough to re-derive it.

It holds the tool versions, the normalised manifest and its sha256, the manifest's git commit,
each source's files with their sha256, every group's method and rank, the random draws, the
sha256 of every output file, the device and the wall time. Only ``wall_time_s`` differs between
two runs of the same inputs on the same device.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

import lorakit
from lorakit.errors import OutputError

__all__ = ["PROVENANCE_NAME", "file_sha256", "git_state", "package_versions"]

logger = logging.getLogger(__name__)

PROVENANCE_NAME = "provenance.json"
# Files are hashed through one reused buffer of this size. Reading 8 MiB bytes objects instead
# left about 24 MiB resident in the hashing thread's malloc arena during a run.
_CHUNK = 2**20


def file_sha256(path: Path) -> str:
    """Hash a file in 1 MiB chunks read into one reused buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    try:
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(buffer):
                digest.update(view[:count])
    except OSError as error:
        raise OutputError(f"{path}: cannot read: {error.strerror or error}") from error
    return digest.hexdigest()


def package_versions() -> dict[str, str | None]:
    """Versions of lorakit, torch, peft and safetensors (None when one is not installed)."""
    versions: dict[str, str | None] = {"lorakit": lorakit.__version__, "torch": torch.__version__}
    for name in ("peft", "safetensors"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(path: Path) -> dict[str, Any] | None:
    """Return the commit of the git repository holding ``path`` and whether ``path`` has uncommitted changes.

    Returns None outside a repository or when git is not installed.
    """
    folder = path.resolve().parent

    def git(*arguments: str) -> str | None:
        try:
            result = subprocess.run(
                ["git", "-C", str(folder), *arguments], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            logger.debug("git %s failed: %s", " ".join(arguments), error)
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None
    status = git("status", "--porcelain", "--", str(path.resolve()))
    return {"commit": commit, "dirty": bool(status), "tracked": git("ls-files", "--error-unmatch", str(path.resolve())) is not None}
