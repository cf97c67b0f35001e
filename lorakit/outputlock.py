"""Guards for writing an output folder: one run per output at a time, and no half-finished renames.

``OutputLock`` is an exclusive ``flock`` on a hidden file beside the output
(``.NAME.lorakit-lock``). The kernel drops the lock when the last descriptor of its open file is
closed, which happens when the process ends, even by SIGKILL (flock(2)). So a lock file left
behind by a killed run does not block a later run. ``deferred_signals`` holds SIGINT and SIGTERM
while a few renames that must not be split run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Iterator

from lorakit.errors import OutputError

try:
    import fcntl
except ImportError:  # Windows has no flock
    fcntl = None

__all__ = ["OutputLock", "deferred_signals", "lock_path"]

logger = logging.getLogger(__name__)

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def lock_path(target: Path) -> Path:
    """Return the lock file of the output folder ``target``."""
    return target.parent / f".{target.name}.lorakit-lock"


class OutputLock:
    """An exclusive lock on the output folder ``target``, held until ``release``.

    Raises:
        OutputError: when another process holds the lock, naming its process id.
    """

    def __init__(self, target: Path):
        self.target = target
        self.path = lock_path(target)
        self._fd: int | None = None
        if fcntl is None:
            # NOTE: without flock (Windows) two runs on one output are not kept apart.
            return
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise OutputError(
                    f"{target}: another lorakit run (process {holder}) is writing this output; wait for it to "
                    "finish or choose another output.path"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # The previous holder unlinks the file before unlocking, so the file locked here may
            # no longer be the one at self.path; then lock the new one instead.
            if _same_file(fd, self.path):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode("ascii"))
                self._fd = fd
            else:
                os.close(fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock; calling it twice does nothing."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (status.st_dev, status.st_ino) == (opened.st_dev, opened.st_ino)


@contextlib.contextmanager
def deferred_signals(redeliver: bool) -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM while the block runs.

    Handlers that only record the signal replace the current ones for the duration of the block,
    so a signal cannot raise KeyboardInterrupt half-way through. Afterwards the old handlers are
    restored and, with ``redeliver``, each recorded signal is raised again. The block gets the list
    of recorded signal numbers. Outside the main thread, where Python cannot set handlers, the
    block runs unguarded.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def record(signum: int, frame: object) -> None:
        received.append(signum)

    previous = {signum: signal.signal(signum, record) for signum in _SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            # None means a handler installed outside Python, which cannot be put back.
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if redeliver:
            for signum in received:
                signal.raise_signal(signum)
