"""Progress bars (tqdm) that respect -q and non-TTY output."""

from __future__ import annotations

import sys

QUIET = False


def bar(iterable=None, *, total=None, desc: str = "", unit: str = "it"):
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=QUIET or None if sys.stderr.isatty() else QUIET,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=1.0,
    )
