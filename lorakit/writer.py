"""Writing outputs: a streamed safetensors writer and an all-or-nothing output folder.

``SafetensorsWriter`` writes the header first, from the planned names, shapes and dtype, then
each tensor's bytes at its offset as soon as it is computed, in any order. The file is
byte-identical to ``safetensors.torch.save_file`` of the same tensors. The header lists tensors
in data order (dtype descending in safetensors' dtype order, then name). It is UTF-8 JSON without
spaces, padded with spaces to a multiple of 8 bytes. One exception: ``save_file`` writes
several metadata keys in hash-map order, which changes from run to run (safetensors 0.8.0), while
this writer sorts them, so equal inputs give equal files. With at most one metadata key the two
agree byte for byte.

``OutputFolder`` builds everything in a hidden temporary folder beside the target and renames it
into place at the end, so a failed or interrupted run leaves no partial output.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import struct
import uuid
from pathlib import Path
from typing import Mapping, Sequence

import torch

from lorakit.errors import LorakitError, OutputError
from lorakit.outputlock import OutputLock, deferred_signals

__all__ = ["FileDigest", "OutputFolder", "SafetensorsWriter", "TensorSpec"]

logger = logging.getLogger(__name__)

# safetensors' dtype names and their rank in its Dtype enum, which orders the data section.
_DTYPE_NAMES = {
    torch.float64: ("F64", 16),
    torch.float32: ("F32", 15),
    torch.bfloat16: ("BF16", 12),
    torch.float16: ("F16", 11),
}

TensorSpec = tuple[str, Sequence[int], torch.dtype]

# FileDigest reads the file back in chunks of this size.
_HASH_CHUNK = 2**20


class SafetensorsWriter:
    """Write a safetensors file whose layout is fixed before any tensor exists.

    ``complete_bytes`` is the length of the file's final prefix, so that a ``FileDigest`` can hash
    it while later tensors are still being computed.

    Args:
        path: the file to create.
        tensors: (name, shape, dtype) of every tensor the file will hold.
        metadata: the ``__metadata__`` string map.
    """

    def __init__(self, path: Path, tensors: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None):
        ordered = sorted(tensors, key=lambda spec: (-_DTYPE_NAMES[spec[2]][1], spec[0]))
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(sorted(metadata.items()))
        self._layout: dict[str, tuple[int, int, tuple[int, ...], torch.dtype]] = {}
        offset = 0
        for name, shape, dtype in ordered:
            if name in self._layout:
                raise ValueError(f"tensor {name!r} is planned twice")
            size = dtype.itemsize * _numel(shape)
            header[name] = {"dtype": _DTYPE_NAMES[dtype][0], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._layout[name] = (offset, size, tuple(shape), dtype)
            offset += size

        encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)
        prefix = struct.pack("<Q", len(encoded)) + encoded
        self._data_start = len(prefix)
        self._pending = set(self._layout)
        self._order = [name for name, _, _ in ordered]
        self._complete = 0
        self.size = self._data_start + offset
        self.path = path
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(self._fd, prefix)
            os.ftruncate(self._fd, self.size)
        except BaseException:
            os.close(self._fd)
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (on the CPU, with the planned shape and dtype) at its offset."""
        offset, size, shape, dtype = self._layout[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        position = self._data_start + offset
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, position)
            view = view[written:]
            position += written
        self._pending.discard(name)
        while self._complete < len(self._order) and self._order[self._complete] not in self._pending:
            self._complete += 1

    @property
    def complete_bytes(self) -> int:
        """Bytes from the start of the file that are final: the header and the tensors before the first unwritten one."""
        if self._complete == len(self._order):
            return self.size
        return self._data_start + self._layout[self._order[self._complete]][0]

    def close(self) -> None:
        """Flush to disk; raise if a planned tensor was never written."""
        try:
            if self._pending:
                missing = sorted(self._pending)
                raise RuntimeError(f"{self.path}: {len(missing)} planned tensor(s) never written, first {missing[0]!r}")
            os.fsync(self._fd)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the file without flushing it; does nothing once it is closed."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class FileDigest:
    """The sha256 of a file that is being written, fed front to back as its bytes become final.

    Each ``update_to`` reads the new bytes back (from the page cache, as they were just written)
    through one reused buffer.
    """

    def __init__(self, path: Path):
        self.path = path
        self.position = 0
        self._digest = hashlib.sha256()
        self._buffer = bytearray(_HASH_CHUNK)

    def update_to(self, end: int) -> None:
        """Hash the file's bytes from the current position up to ``end``.

        Raises:
            OSError: when the file cannot be read or ends before ``end``.
        """
        if end <= self.position:
            return
        view = memoryview(self._buffer)
        with open(self.path, "rb", buffering=0) as handle:
            handle.seek(self.position)
            while self.position < end:
                count = handle.readinto(view[: min(len(view), end - self.position)])
                if not count:
                    raise OSError(f"{self.path}: the file ends at {self.position} bytes, before {end}")
                self._digest.update(view[:count])
                self.position += count

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def is_lorakit_output(folder: Path) -> bool:
    """Return whether ``folder`` is a lorakit output: it, or each of its ``seed-*`` folders, has a provenance record."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    if (folder / "provenance.json").is_file():
        return True
    entries = list(folder.iterdir())
    return bool(entries) and all(entry.name.startswith("seed-") and (entry / "provenance.json").is_file() for entry in entries)


def _check_replaceable(target: Path) -> None:
    # --force replaces earlier outputs only, so a mistyped output.path cannot delete unrelated data.
    if not is_lorakit_output(target):
        raise OutputError(
            f"{target}: exists and is not a lorakit output (no provenance.json), so --force does not replace it; "
            "remove it yourself or choose another output.path"
        )


def _file_among_parents(target: Path) -> Path | None:
    """Return the nearest parent of ``target`` that exists as something other than a folder, if any."""
    for parent in target.parents:
        if parent.exists() or parent.is_symlink():
            return None if parent.is_dir() else parent
    return None


class OutputFolder:
    """A temporary folder beside ``target`` that becomes ``target`` on ``commit``.

    While it exists, the run keeps an ``OutputLock`` on ``target``, so a second run writing the same
    output fails at once. Under the lock, leftovers of runs that were killed (SIGKILL, power loss)
    are cleaned up first: their temporary folders are removed, and a previous output that a killed
    run had moved aside is put back.

    Raises:
        OutputError: when ``target`` exists and ``force`` is false, another run holds the lock, or
            the folders cannot be created.
    """

    def __init__(self, target: Path, force: bool):
        self.target = target
        self.force = force
        self.committed = False
        self.temporary: Path | None = None
        self._lock: OutputLock | None = None
        self._created_parents: list[Path] = []

        with deferred_signals(redeliver=True):
            try:
                self._check_absent()
                parent = target.parent
                while not parent.exists():
                    self._created_parents.append(parent)
                    parent = parent.parent
                target.parent.mkdir(parents=True, exist_ok=True)
                self._lock = OutputLock(target)
                self._clean_leftovers()
                self._check_absent()
                self.temporary = target.parent / f".{target.name}.lorakit-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                self.temporary.mkdir()
            except BaseException as error:
                self._release()
                if isinstance(error, OSError) and not isinstance(error, LorakitError):
                    blocking = _file_among_parents(target)
                    if blocking is not None:
                        raise OutputError(
                            f"{target}: cannot create the output folder because {blocking} is a file, not a folder; "
                            "change output.path or move that file"
                        ) from error
                    raise OutputError(f"{target}: cannot create the output folder: {error.strerror or error}") from error
                raise

    def _check_absent(self) -> None:
        if not (self.target.exists() or self.target.is_symlink()):
            return
        # Checked first, so the message never suggests a --force that would be refused.
        _check_replaceable(self.target)
        if not self.force:
            raise OutputError(f"{self.target}: output already exists; pass --force to replace it, or change output.path")

    def _clean_leftovers(self) -> None:
        """Remove what killed runs left beside the target; only runs holding the lock make such files."""
        for path in sorted(self.target.parent.glob(f".{glob.escape(self.target.name)}.lorakit-*")):
            if path == self._lock.path:
                continue
            if path.name.startswith(f".{self.target.name}.lorakit-old-") and not self.target.exists():
                logger.warning("%s: a killed run left the previous output at %s; putting it back", self.target, path)
                os.rename(path, self.target)
                continue
            logger.info("%s: removing %s, left by a killed run", self.target, path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()

    def commit(self) -> None:
        """Move the finished temporary folder into place, replacing an old output under ``force``.

        SIGINT and SIGTERM are held during the renames. One that arrives then is logged and not
        raised again, because by then the output is complete.
        """
        backup = None
        with deferred_signals(redeliver=False) as received:
            try:
                if self.target.exists():
                    if not self.force:
                        raise OutputError(f"{self.target}: output appeared while this run was writing; pass --force to replace it")
                    _check_replaceable(self.target)
                    backup = self.target.parent / f".{self.target.name}.lorakit-old-{uuid.uuid4().hex[:8]}"
                    os.rename(self.target, backup)
                os.rename(self.temporary, self.target)
            except OSError as error:
                if backup is not None and not self.target.exists():
                    os.rename(backup, self.target)
                if isinstance(error, LorakitError):
                    raise
                raise OutputError(f"{self.target}: cannot move the finished output into place: {error.strerror or error}") from error
            self.committed = True
            self._created_parents = []
            if backup is not None:
                shutil.rmtree(backup, ignore_errors=True)
            self._release()
        for signum in received:
            logger.warning("received signal %d while moving the output into place; the output is complete", signum)

    def discard(self) -> None:
        """Remove the temporary folder and any parent folders this run created, then release the lock."""
        with deferred_signals(redeliver=True):
            if self.temporary is not None and not self.committed:
                shutil.rmtree(self.temporary, ignore_errors=True)
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        for folder in self._created_parents:
            try:
                folder.rmdir()
            except OSError:
                break
        self._created_parents = []
