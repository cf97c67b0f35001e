"""Error types that leave the command line as one message and an exit code.

Exit codes: 0 success, 1 invalid input (manifest or adapter), 2 I/O failure (unreadable input,
unwritable output, full disk, permissions, an existing output, another run writing the same
output), 130 interrupted by SIGINT or SIGTERM. docs/errors.md shows a message for each.
"""

from __future__ import annotations

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_INVALID_INPUT",
    "EXIT_IO",
    "AdapterError",
    "LorakitError",
    "ManifestError",
    "OutputError",
]

EXIT_INVALID_INPUT = 1
EXIT_IO = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a process ended by Ctrl-C


class LorakitError(Exception):
    """Base class of every error lorakit reports to the user without a traceback."""

    exit_code = EXIT_INVALID_INPUT


class ManifestError(LorakitError, ValueError):
    """An invalid manifest: one message per problem, each starting with ``FILE:LINE:COL:``."""

    def __init__(self, messages: list[str] | str):
        self.messages = [messages] if isinstance(messages, str) else list(messages)
        super().__init__("\n".join(self.messages))


class AdapterError(LorakitError, ValueError):
    """A source adapter that cannot be merged: bad config, unexpected tensors, wrong shapes."""


class OutputError(LorakitError, OSError):
    """A failure to read or write files: a missing or unreadable file, missing permissions, a full
    disk, an existing output, or another run writing the same output."""

    exit_code = EXIT_IO
