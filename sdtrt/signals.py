"""Ctrl-C and SIGTERM end any sdtrt command promptly, with the conventional exit codes.

SIGINT raises KeyboardInterrupt (Python's default); SIGTERM raises `Terminated`, a KeyboardInterrupt,
so every cleanup path (temporary folders, engine-build workers) handles both alike. The CLI maps
them to exit codes 130 and 143 (128 + signal number).
"""

from __future__ import annotations

import signal
import threading


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


EXIT_CODES = {Terminated: 128 + signal.SIGTERM, KeyboardInterrupt: 128 + signal.SIGINT}


def exit_code(exc: KeyboardInterrupt) -> int:
    return EXIT_CODES[Terminated] if isinstance(exc, Terminated) else EXIT_CODES[KeyboardInterrupt]


def _raise_terminated(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Terminated()


def install() -> None:
    """Make SIGTERM interrupt like Ctrl-C (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
