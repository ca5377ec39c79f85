"""Progress bars (tqdm) that respect -q and non-TTY output."""

from __future__ import annotations

import sys

QUIET = False


def bar(iterable=None, *, total=None, desc: str = "", unit: str = "it"):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the engine side's minimal environments (the TensorRT kit) may lack tqdm
        return _Plain(iterable)

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


class _Plain:
    def __init__(self, iterable):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n=1):
        pass

    def set_description(self, desc):
        pass

    def close(self):
        pass
