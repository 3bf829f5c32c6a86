"""Replicated blocks: a variable held whole by several ranks is written by one of them, so
the coordinator compares the CRC32C of every holder's copy before the commit."""

from __future__ import annotations

import threading

import numpy as np

from ..errors import InvalidArgumentError
from ..plan import Block
from .writer import entry_crcs


class ReplicaCrcs:
    """The masked CRC32C of every replica this rank holds, as ``(replica number, crc)``:
    computed in a second thread for the copies it does not write, taken from the writer's
    entries for those it does."""

    def __init__(self, replicas: list[tuple[int, np.ndarray, int]]):
        self._replicas = replicas
        self._copies: dict[int, int] = {}
        self._error: BaseException | None = None
        self._thread = None
        if any(pos < 0 for _, _, pos in replicas):
            self._thread = threading.Thread(target=self._compute, name="shardsave-replica-crcs", daemon=True)
            self._thread.start()

    def _compute(self) -> None:
        try:
            copies = [(number, array) for number, array, pos in self._replicas if pos < 0]
            self._copies = dict(zip([n for n, _ in copies], entry_crcs([a for _, a in copies]), strict=True))
        except Exception as exc:  # noqa: BLE001 - raised by result()
            self._error = exc

    def result(self, masks: list[int]) -> list[tuple[int, int]]:
        """``masks``: the entry CRCs of this rank's writes, which must have succeeded."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return [
            (number, self._copies[number] if pos < 0 else masks[pos]) for number, _, pos in self._replicas
        ]


def checked_replicas(prefix: str, plan, gathered: list[tuple]) -> list[tuple]:
    """The coordinator's check that every rank holding a replica holds the same bytes; the
    gathered ``(index part, bytes written, replica CRCs)`` without the CRCs."""
    holders: dict[int, dict[int, list[int]]] = {}  # replica -> crc -> ranks
    for rank, (_, _, crcs) in enumerate(gathered):
        for number, crc in crcs:
            holders.setdefault(number, {}).setdefault(crc, []).append(rank)
    differ = [(number, by_crc) for number, by_crc in sorted(holders.items()) if len(by_crc) > 1]
    if differ:
        shown = "; ".join(_replica_difference(plan.replicas[number], by_crc) for number, by_crc in differ[:5])
        more = f" (and {len(differ) - 5} more)" if len(differ) > 5 else ""
        raise InvalidArgumentError(
            f"saving {prefix}: {shown}{more}; nothing was committed. A variable held whole by several "
            "ranks is stored once, so its copies must be equal; to save per-rank state (e.g. RNG keys) "
            "give it a leading rank axis (global_shape=(size, ...), offset=(rank, ...)), or pass "
            "Saver(check_replicas=False) to store one rank's copy"
        )
    return [(part, written) for part, written, _ in gathered]


def _replica_difference(replica: tuple[str, Block], by_crc: dict[int, list[int]]) -> str:
    name, block = replica
    where = "" if not any(block.offset) else f" (block at offset {list(block.offset)})"
    groups = sorted(by_crc.values(), key=min)
    values = ", ".join(
        f"rank(s) {', '.join(map(str, ranks))} value {_letter(i)}" for i, ranks in enumerate(groups)
    )
    return f"variable {name!r}{where} differs between the ranks that hold it: {values}"


def _letter(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else str(i + 1)
