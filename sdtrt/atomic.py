"""Write a directory of artifacts so that it appears complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import SdtrtError


def check_output_dir(out: Path, force: bool, flag: str = "--force") -> None:
    """Refuse to overwrite an existing output unless the user said so."""
    if out.exists() and not force:
        raise SdtrtError(f"output directory {out} already exists.", f"choose another path or pass {flag} to replace it")
    if out.exists() and not out.is_dir():
        raise SdtrtError(f"output path {out} exists and is not a directory.", "choose a directory path")


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `out`, on any failure it is removed.

    The temporary name starts with a dot and ends in `.partial`, so a killed process leaves
    something that no sdtrt command mistakes for a finished directory.
    """
    out = Path(out).absolute()
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any directory the user makes
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.{os.getpid()}.old"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_abandoned(out: Path) -> None:
    """Delete partial folders for `out` left by processes that no longer exist (a killed export)."""
    for stale in out.parent.glob(f".{out.name}.*.partial"):
        pid = stale.name[len(out.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
