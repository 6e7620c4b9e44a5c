"""Errors a user can hit. Each one says what went wrong and what to do about it."""

from __future__ import annotations


class SdtrtError(Exception):
    """A problem with the user's input or environment; the CLI prints it without a traceback.

    `fix` is worded for Python callers; `cli_fix`, where given, for the command line (flags)."""

    def __init__(self, problem: str, fix: str | None = None, cli_fix: str | None = None):
        self.problem = problem
        self.fix = fix
        self.cli_fix = cli_fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")


class MissingDependency(SdtrtError):
    """An optional library is not installed; names the pip extra that brings it."""

    def __init__(self, module: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the Python module '{module}', which is not installed.",
            f"pip install 'sdtrt[{extra}]'",
        )


class OutOfMemory(SdtrtError):
    """A backend could not allocate `requested` bytes for `component`; the pipeline rewords it with the request's size."""

    def __init__(self, component: str, problem: str | None = None, fix: str | None = None, cli_fix: str | None = None,
                 requested: int | None = None):
        self.component = component
        self.requested = requested
        super().__init__(problem or f"the {component} ran out of memory.", fix or "use a smaller size or batch", cli_fix)

    def largest_side(self, side: int) -> int | None:
        """About the largest square side (px, a multiple of 8) that fits in the memory free now, assuming the
        failed allocation is attention's, which grows with the fourth power of the side."""
        free = available_memory()
        if not self.requested or not free:
            return None
        return max(8, int(side * (0.8 * free / self.requested) ** 0.25) // 8 * 8)


def available_memory() -> int | None:
    """Bytes the kernel says are available (Linux), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def require(module: str, extra: str, purpose: str):
    """Import an optional module or raise MissingDependency naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name is not None and e.name.split(".")[0] != module.split(".")[0]:
            raise  # the module exists but one of its own imports failed: show that, not a fake "missing"
        raise MissingDependency(module, extra, purpose) from None
