"""Progress bars on stderr (tqdm), so stdout stays clean for tables and JSON."""

from __future__ import annotations

import sys


def progress(total: int | None = None, desc: str = "", disable: bool = False, unit: str = "it"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=disable, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)
