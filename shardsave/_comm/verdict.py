"""The coordinator's verdict at the end of a collective step (see :meth:`Comm.agree`):
what each rank reports, and how the coordinator combines the reports into the one outcome
every rank raises or goes on with, naming the missing, late, astray or disagreeing ranks."""

from __future__ import annotations

import time
from typing import NamedTuple

from .._reports import combined_error, describe

LATE_MARGIN = 0.25
"""A rank whose give-up time is nearer than this (seconds) counts as gone: the verdict
might not reach it in time."""


class Report(NamedTuple):
    """What one rank tells the coordinator at one ``agree``."""

    rank: int
    call: str  # the public call in progress, e.g. "Saver.save"
    step: int  # how many agrees into that call (1 = the first)
    what: str  # e.g. "saving /d/ckpt-3"
    key: dict | None  # what every rank must agree on (first step), e.g. the prefix
    error: tuple | None  # describe's (class name, message, errno, file)
    gives_up_at: float | None  # wall-clock time at which this rank stops waiting
    flag: bool  # for all_true


class Verdict(NamedTuple):
    call: str  # the receiver's call and step it answers; step 0: sent to a rank that was
    step: int  # missing, which will find it when (if ever) it arrives
    error: tuple | None  # (class name in shardsave.errors, message[, errno, file]); None: go on
    all_true: bool  # whether every rank's flag was true


def expected(call: str, step: int) -> str:
    return f"call {call}" if step == 1 else f"reach step {step} of {call}"


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, sorted(ranks)))


def decide(mine: Report, reports: dict[int, Report], size: int, timeout: float | None) -> tuple | None:
    """The coordinator's verdict: None if every rank arrived, at the same step, agreeing on
    the key, without error; else the error (class name, message) every rank raises."""
    what = mine.what
    missing = [rank for rank in range(size) if rank not in reports]
    if missing:
        return "DeadlineExceededError", (
            f"{what}: rank(s) {_ranks(missing)} did not {expected(mine.call, mine.step)} within {timeout:g} s"
        )
    now = time.time()
    late = [
        r.rank for r in reports.values() if r.gives_up_at is not None and now + LATE_MARGIN > r.gives_up_at
    ]
    if late:  # they stopped waiting for this coordinator: going on would leave them behind
        return "DeadlineExceededError", (
            f"{what}: rank 0 (the coordinator) did not {expected(mine.call, mine.step)} before rank(s) "
            f"{_ranks(late)} stopped waiting for it (their timeout)"
        )
    steps: dict[tuple[str, int], list[int]] = {}
    for r in reports.values():
        steps.setdefault((r.call, r.step), []).append(r.rank)
    if len(steps) > 1:
        detail = "; ".join(
            f"rank(s) {_ranks(ranks)}: {call} (step {step}: {reports[ranks[0]].what})"
            for (call, step), ranks in sorted(steps.items(), key=lambda kv: min(kv[1]))
        )
        return "InvalidArgumentError", f"{what}: the ranks are not in the same collective call: {detail}"
    disagreement = _key_disagreement(reports)
    if disagreement:
        return "InvalidArgumentError", (
            f"{mine.call}: the ranks disagree on {disagreement}; every rank must pass the same; "
            "nothing was written"
        )
    failed = [(rank, reports[rank].error) for rank in sorted(reports) if reports[rank].error is not None]
    if failed:
        return describe(combined_error(failed, what))
    return None


def _key_disagreement(reports: dict[int, Report]) -> str:
    """``"prefix: rank(s) 0 '/d/ckpt-1', rank(s) 1, 2 '/d/ckpt-2'"`` for every field that
    differs (the prefix or path first; ``location``, where it leads, only if they agree)."""
    # a rank that failed before it could say what it was doing has no key: its error counts
    keys = {rank: reports[rank].key for rank in sorted(reports) if reports[rank].key is not None}
    first = ("prefix", "path", "location")
    fields = sorted(
        {f for key in keys.values() for f in key}, key=lambda f: (first.index(f) if f in first else 3, f)
    )
    parts = {}
    for field in fields:
        values: dict[str, list[int]] = {}
        for rank, key in keys.items():
            values.setdefault(repr(key.get(field)), []).append(rank)
        if len(values) > 1:
            parts[field] = ", ".join(f"rank(s) {_ranks(ranks)} {value}" for value, ranks in values.items())
    if "location" in parts and ("prefix" in parts or "path" in parts):
        del parts["location"]
    return "; ".join(f"{field}: {detail}" for field, detail in parts.items())
