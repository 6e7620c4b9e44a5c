"""Every file and folder sdtrt writes goes through here: appears complete or not at all, never
clobbers what the user did not ask to replace, and gets the permissions a plain open() gives.

- `atomic_dir(out)` / `atomic_file(path)` yield a hidden temporary sibling (`.NAME.PID.*.partial`)
  and rename it into place on success; on any failure, Ctrl-C or SIGTERM it is removed. A process
  killed with SIGKILL leaves only that hidden name, which the next write to the same place removes
  (its PID is dead).
- Two processes writing the same output never tear it: the rename is atomic and the last one wins.
- Temporary files are made by mkstemp/mkdtemp (0600/0700); before the rename they get
  0666/0777 minus the caller's umask, as if open()/mkdir() had made them.
- `check_can_write(path)` proves a destination is writable before any slow work starts.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import SdtrtError

PARTIAL = ".partial"


# --- permissions ---------------------------------------------------------------------------------


def umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def apply_umask(root: Path) -> None:
    """Give `root` (a file, or a folder and everything in it) the modes open()/mkdir() would."""
    mask = umask()
    root = Path(root)
    if root.is_file():
        root.chmod(0o666 & ~mask)
        return
    root.chmod(0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for d in dirs:
            Path(folder, d).chmod(0o777 & ~mask)
        for f in files:
            Path(folder, f).chmod(0o666 & ~mask)


# --- checks before work ----------------------------------------------------------------------------


def check_output_dir(out: Path, force: bool, flag: str = "--force") -> None:
    """Refuse to replace an existing output unless asked; prove the place is writable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SdtrtError(f"output path {out} exists and is not a directory.", "choose a directory path for --out")
    if out.exists() and not force:
        raise SdtrtError(f"output directory {out} already exists.", f"choose another --out path or pass {flag} to replace it")
    check_can_write(out)


def check_not_inside(out: Path, source: Path, what: str) -> None:
    """`--out` must not be, contain, or lie inside the input: replacing it would destroy the input."""
    o, s = Path(out).resolve(), Path(source).resolve()
    if o == s or s in o.parents or o in s.parents:
        relation = "is" if o == s else ("is inside" if s in o.parents else "contains")
        raise SdtrtError(f"--out {out} {relation} the {what} {source}; writing there would destroy the {what}.",
                         f"choose an --out folder outside {source}")


def check_can_write(path: Path, flag: str = "--out") -> None:
    """Raise SdtrtError unless a file or folder can be created at `path` (tried for real: permission
    bits do not tell root or read-only mounts apart)."""
    path = Path(path).absolute()
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SdtrtError(f"cannot write {path}: {parent} is a file, not a folder.", f"choose another {flag} path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sdtrt-write-check.", dir=parent)
    except OSError as e:
        raise SdtrtError(f"cannot write {path}: {parent} is not writable ({e.strerror}).",
                         f"choose a {flag} path in a folder you can write to") from None
    os.close(fd)
    os.unlink(probe)


def cache_dir(instead: str | None = None) -> Path:
    """$SDTRT_CACHE or ~/.cache/sdtrt, created on first use; refused (naming the variable, and `instead`:
    the flag that does without the cache) if unusable."""
    env = os.environ.get("SDTRT_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "sdtrt"
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".sdtrt-write-check.", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        where = f"SDTRT_CACHE={env}" if env else f"the cache folder {root}"
        raise SdtrtError(f"{where} is not a writable folder ({e.strerror or e}).",
                         "set SDTRT_CACHE to a folder you can write to (export SDTRT_CACHE=/path/to/cache)"
                         + (f", or pass {instead}" if instead else "")) from None
    return root


# --- atomic writes -----------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it becomes `out`, on any failure it is removed."""
    out = Path(out).absolute()
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=PARTIAL, dir=out.parent))
    try:
        yield tmp
        apply_umask(tmp)
        _commit_dir(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit_dir(tmp: Path, out: Path, force: bool) -> None:
    """Rename `tmp` to `out`. A folder cannot atomically replace a non-empty folder, so an old `out`
    is first moved aside; if another writer puts its own `out` back in between, it is moved aside
    again (the last writer wins, and `out` is always one writer's complete folder)."""
    old: list[Path] = []
    try:
        for attempt in range(100):
            try:
                os.rename(tmp, out)
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                    raise
            if not force:
                raise SdtrtError(f"{out} was created by another process while this one was writing it.",
                                 "pass --force to replace it, or choose another --out")
            aside = out.parent / f".{out.name}.{os.getpid()}.{attempt}.old{PARTIAL}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(out, aside)
                old.append(aside)
        raise SdtrtError(f"could not put {out} in place: other processes keep writing it.", "run one writer at a time")
    finally:
        for path in old:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: Path, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; on success it becomes `path`.

    force=False never replaces an existing file, even one created by another process meanwhile
    (the final step is link(), which fails if the name exists)."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=PARTIAL, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        apply_umask(tmp)
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise SdtrtError(f"{path} already exists.", "choose another output name, or pass --force to replace it") from None
            tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: Path, data: bytes, force: bool = True) -> Path:
    with atomic_file(path, force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: Path, text: str, force: bool = True) -> Path:
    with atomic_file(path, force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def remove_abandoned(out: Path) -> None:
    """Delete `.NAME.PID.*.partial` siblings of `out` left by processes that no longer exist."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    for stale in out.parent.glob(f".{glob_escape(out.name)}.*{PARTIAL}"):
        pid = stale.name[len(out.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- hashing -----------------------------------------------------------------------------------


def file_sha256(path: Path | str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
