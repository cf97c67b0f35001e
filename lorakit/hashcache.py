"""A cache of the sha256 of source files, so that repeated runs on the same adapters skip re-hashing.

An entry is reused only while the file's device, inode, size, mtime and ctime (in nanoseconds)
are unchanged, the signature git's index and DVC's state database also rely on. User space can
set mtime but not ctime, and every write, truncation or rename updates ctime. An entry is
stored only when the file's ctime is at least ``RACY_NS`` older than the moment hashing began, so
that a write in the same filesystem timestamp tick as the hash cannot leave a stale entry
(git's "racily clean" case). The cache is an optimisation: a cache that cannot be read or written
is ignored, with a debug log.

The cache lives in ``$LORAKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lorakit``, else
``~/.cache/lorakit``. Setting ``LORAKIT_CACHE_DIR`` to an empty string disables it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path

from lorakit.provenance import file_sha256

__all__ = ["CACHE_ENV", "HashCache"]

logger = logging.getLogger(__name__)

CACHE_ENV = "LORAKIT_CACHE_DIR"
CACHE_NAME = "sha256-v1.json"
RACY_NS = 2 * 10**9
MAX_ENTRIES = 4096


def _signature(stat: os.stat_result) -> list[int]:
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


class HashCache:
    """File path → (stat signature, sha256), loaded on first use and merged into the file on ``save``.

    Args:
        folder: the cache folder, or None for a cache that only hashes.
    """

    def __init__(self, folder: Path | None):
        self.folder = folder
        self._entries: dict[str, dict] | None = None
        self._added: dict[str, dict] = {}
        self._lock = threading.Lock()

    @classmethod
    def default(cls) -> HashCache:
        """Return the cache in the folder the environment names (see the module docstring)."""
        configured = os.environ.get(CACHE_ENV)
        if configured is not None:
            return cls(Path(configured) if configured else None)
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return cls(Path(base) / "lorakit")

    def sha256(self, path: Path) -> str:
        """Return the sha256 of ``path``, from the cache while the file is unchanged, else by hashing it.

        Raises:
            OutputError: when the file cannot be read.
        """
        key = str(path.resolve())
        try:
            signature = _signature(os.stat(path))
        except OSError:
            return file_sha256(path)
        entry = self._load().get(key)
        if isinstance(entry, dict) and entry.get("stat") == signature and isinstance(entry.get("sha256"), str):
            return entry["sha256"]

        began = time.time_ns()
        digest = file_sha256(path)
        try:
            unchanged = _signature(os.stat(path)) == signature
        except OSError:
            unchanged = False
        if unchanged and began - signature[4] >= RACY_NS:
            with self._lock:
                self._added[key] = {"stat": signature, "sha256": digest}
        return digest

    def save(self) -> None:
        """Merge the new entries into the cache file, keeping the ``MAX_ENTRIES`` newest."""
        with self._lock:
            added = dict(self._added)
        if self.folder is None or not added:
            return
        path = self.folder / CACHE_NAME
        temporary = self.folder / f".{CACHE_NAME}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            entries = {**self._read(path), **added}
            newest = dict(list(entries.items())[-MAX_ENTRIES:])
            temporary.write_text(json.dumps(newest))
            os.replace(temporary, path)
        except OSError as error:
            logger.debug("cannot write the hash cache %s: %s", path, error)
            temporary.unlink(missing_ok=True)

    def _load(self) -> dict[str, dict]:
        with self._lock:
            if self._entries is None:
                self._entries = self._read(self.folder / CACHE_NAME) if self.folder is not None else {}
            return self._entries

    @staticmethod
    def _read(path: Path) -> dict[str, dict]:
        try:
            entries = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            logger.debug("ignoring the unreadable hash cache %s: %s", path, error)
            return {}
        return entries if isinstance(entries, dict) else {}
