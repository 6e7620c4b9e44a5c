"""Errors a user can hit. Each one says what went wrong and what to do about it."""

from __future__ import annotations


class SdtrtError(Exception):
    """A problem with the user's input or environment; the CLI prints it without a traceback."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")


class MissingDependency(SdtrtError):
    """An optional library is not installed; names the pip extra that brings it."""

    def __init__(self, module: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the Python module '{module}', which is not installed.",
            f"pip install 'sdtrt[{extra}]'",
        )


def require(module: str, extra: str, purpose: str):
    """Import an optional module or raise MissingDependency naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name is not None and e.name.split(".")[0] != module.split(".")[0]:
            raise  # the module exists but one of its own imports failed: show that, not a fake "missing"
        raise MissingDependency(module, extra, purpose) from None
