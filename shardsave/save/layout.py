"""What one rank saves and restores, in a fixed order, and what a save derived from it
last time.

A training loop saves the same variables again and again; their names, shapes and dtypes
do not change, so neither do the metadata a rank sends the others nor the agreed plan.
:class:`SaveLayout` keeps both and hands them back while every array still has the shape
and dtype it had, so a save of many small variables checks them in a few list passes
instead of rebuilding per-variable records each time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..plan import BlockMeta
    from ..variables import Variable


class SaveLayout:
    def __init__(self, saveables: Mapping[str, Sequence[Variable]]):
        self.names = [name for name, blocks in saveables.items() for _ in blocks]
        self.variables = [var for blocks in saveables.values() for var in blocks]
        # declared when each variable was made and fixed since: a restore checks against them
        self.dtypes = [var.dtype for var in self.variables]
        self.shapes = [var.shape for var in self.variables]
        self.whole = np.array([var.shape == var.global_shape for var in self.variables], bool)
        self.metas: list[BlockMeta] | None = None
        self._signature: tuple[list, list] | None = None
        self.plan: Any = None
        """What the saver derived from ``metas`` on every rank (None until then)."""
        self.string_items: list[int] = []
        """Positions of the string tensors, checked again at every save."""

    def arrays(self) -> list[np.ndarray | None]:
        return [var._value for var in self.variables]

    def cached_metas(self, arrays: Sequence[np.ndarray | None]) -> list[BlockMeta] | None:
        """The metadata remembered for arrays of these shapes and dtypes, or None."""
        if self.metas is None:
            return None
        try:
            signature = ([a.shape for a in arrays], [a.dtype for a in arrays])
        except AttributeError:  # an uninitialized variable: the full check explains it
            return None
        return self.metas if signature == self._signature else None

    def remember(self, arrays: Sequence[np.ndarray], metas: list[BlockMeta], strings: list[int]) -> None:
        """Keep ``metas`` for arrays like these; forgets the plan made for the old ones."""
        self._signature = ([a.shape for a in arrays], [a.dtype for a in arrays])
        self.metas, self.plan, self.string_items = metas, None, strings
