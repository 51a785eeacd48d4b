"""A progress bar of named steps for long runs (the red teams)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def step_ticker(total: int, desc: str, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """Yield ``tick(what)``: advance a ``total``-step bar on stderr by one, naming the step
    just done; the bar closes when the block ends, whatever ended it."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=not enabled)

    def tick(what: str) -> None:
        bar.set_postfix_str(what, refresh=False)
        bar.update()

    try:
        yield tick
    finally:
        bar.close()
