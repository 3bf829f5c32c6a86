"""Ranks that do not do the same thing, on 3 real mpiexec ranks (issue 11, "Ranks must
agree before anything is written").

tests/ranks/timeouts.py: one rank never calls ``save``, ``restore`` or the constructor;
the others raise DeadlineExceededError naming it within about the timeout (2 s) instead of
hanging. tests/ranks/disagree.py: ranks that pass different prefixes, options or paths, or
call different methods, or hold different values of a replicated variable; every rank
raises the same InvalidArgumentError and nothing is written or committed.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from faults.common import run_mpi

import shardsave as ss

HERE = os.path.dirname(os.path.abspath(__file__))
RANKS = 3
TIMEOUT = 2.0  # tests/ranks/timeouts.py


def matches(stdout: str, pattern: str) -> list[tuple[str, ...]]:
    """The groups of every line of ``stdout`` that matches ``pattern``."""
    return [m.groups() for line in stdout.splitlines() if (m := re.match(pattern, line))]


def run_timeouts(case: str, tmp_path, absent: int = RANKS - 1, late: bool = False) -> dict[int, list[str]]:
    """Each waiting rank's printed outcomes: ``{rank: [line, ...]}``."""
    script = os.path.join(HERE, "ranks", "timeouts.py")
    args = [script, "--dir", str(tmp_path), "--case", case, "--absent", str(absent)] + ["--late"] * late
    proc = run_mpi(RANKS, args, timeout=60)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    # after a constructor's timeout the ranks leave without MPI_Finalize (their duplication
    # of COMM_WORLD never completes), which mpiexec may report as a kill
    assert proc.returncode == 0 or case == "constructor", log
    lines = {}
    for rank in range(RANKS):
        path = tmp_path / f"rank-{rank}.out"
        if path.exists():
            lines[rank] = path.read_text().splitlines()
    assert sorted(lines) == [r for r in range(RANKS) if r != absent or late], log  # the absent says nothing
    return lines


def assert_deadline(line: str, call: str) -> None:
    match = re.match(r"DeadlineExceededError after ([\d.]+) s: (.*)", line)
    assert match, line
    waited, message = float(match.group(1)), match.group(2)
    assert TIMEOUT - 0.1 <= waited < TIMEOUT + 5, line  # bounded, and not before the timeout
    assert f"rank(s) {RANKS - 1} did not call {call} within 2 s" in message, line


@pytest.mark.parametrize("case, call", [("save", "Saver.save"), ("restore", "Saver.restore")])
def test_a_rank_that_never_calls_makes_the_others_raise_after_the_timeout(case, call, tmp_path):
    for rank, lines in run_timeouts(case, tmp_path).items():
        assert len(lines) == 2, (rank, lines)
        assert_deadline(lines[0], call)
        # afterwards the communicator is unusable, and says so at once
        assert lines[1].startswith("FailedPreconditionError after 0.0 s: "), lines[1]
        assert "unusable since an earlier collective step timed out" in lines[1], lines[1]
    if case == "save":
        assert not [n for n in os.listdir(tmp_path) if n.startswith("ckpt-2")]


def test_a_coordinator_that_comes_too_late_is_named_and_does_not_go_on_alone(tmp_path):
    outcomes = run_timeouts("save", tmp_path, absent=0, late=True)
    # it finds the others' reports, but they have given up: it must fail too, at once,
    # rather than go on into a collective the others never join
    late = outcomes.pop(0)
    assert late[0].startswith("DeadlineExceededError after 0.0 s: "), late
    assert late[0].endswith(
        "ckpt-2: rank 0 (the coordinator) did not call Saver.save before rank(s) 1, 2 "
        "stopped waiting for it (their timeout)"
    ), late
    assert "unusable since an earlier collective step timed out" in late[1], late
    for lines in outcomes.values():
        match = re.match(r"DeadlineExceededError after ([\d.]+) s: (.*)", lines[0])
        assert match, lines
        # they wait for the coordinator's verdict a grace longer: 2 + 2 s
        assert 2 * TIMEOUT - 0.1 <= float(match.group(1)) < 2 * TIMEOUT + 5, lines[0]
        assert match.group(2).endswith("ckpt-2: rank 0 (the coordinator) did not call Saver.save within 4 s")
        assert "unusable since an earlier collective step timed out" in lines[1], lines[1]


def test_constructing_a_saver_is_bounded_by_the_timeout(tmp_path):
    for lines in run_timeouts("constructor", tmp_path).values():
        (line,) = lines
        match = re.match(r"DeadlineExceededError after ([\d.]+) s: (.*)", line)
        assert match, line
        assert TIMEOUT - 0.1 <= float(match.group(1)) < TIMEOUT + 5, line
        assert (
            "constructing a Saver: not all 3 ranks of the communicator constructed a Saver within 2 s" in line
        )


def test_deadline_exceeded_is_a_shardsave_error_and_a_timeout_error():
    assert issubclass(ss.DeadlineExceededError, ss.ShardsaveError)
    assert issubclass(ss.DeadlineExceededError, TimeoutError)
    assert ss.errors.DeadlineExceededError is ss.DeadlineExceededError
    assert "DeadlineExceededError" in ss.__all__ and "DeadlineExceededError" in ss.errors.__all__


@pytest.mark.parametrize("timeout", [0, -1.0, "5", True])
def test_timeout_must_be_positive_or_none(timeout):
    ss.reset_default_graph()
    v = ss.Variable("v", dtype=np.float32, shape=(2,))
    with pytest.raises(ss.InvalidArgumentError, match="timeout must be a positive number"):
        ss.Saver({"v": v}, timeout=timeout)


@pytest.fixture(scope="module")
def disagree(tmp_path_factory):
    """The run of tests/ranks/disagree.py: (its directory, ``{(case, rank): outcome}``,
    ``{snapshot: {file: sha256}}``)."""
    directory = str(tmp_path_factory.mktemp("disagree"))
    proc = run_mpi(RANKS, [os.path.join(HERE, "ranks", "disagree.py"), "--dir", directory], timeout=90)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    cases = {
        (case, int(rank)): rest for case, rank, rest in matches(proc.stdout, r"case (\w+) rank (\d+): (.*)")
    }
    files = {name: json.loads(rest) for name, rest in matches(proc.stdout, r"files (\w+) (.*)")}
    return directory, cases, files


def same_error_on_every_rank(cases: dict, case: str) -> str:
    messages = {cases[(case, rank)] for rank in range(RANKS)}
    assert len(messages) == 1, messages  # every rank raises, and the same error
    return messages.pop()


def test_ranks_with_different_prefixes_write_nothing(disagree):
    directory, cases, files = disagree
    message = same_error_on_every_rank(cases, "prefix")
    prefix = os.path.join(directory, "agree", "ckpt")
    assert message == (
        f"InvalidArgumentError: Saver.save: the ranks disagree on prefix: rank(s) 0 "
        f"'{prefix}-1', rank(s) 1, 2 '{prefix}-2'; every rank must pass the same; nothing was written"
    )
    # the lagging coordinator named the committed ckpt-1: not one of its bytes changed
    assert files["after"] == files["before"]
    assert sorted(files["before"]) == [
        "checkpoint",
        *(f"ckpt-1.data-0000{r}-of-00003" for r in range(3)),
        "ckpt-1.index",
    ]
    assert cases[("restore", 0)] == "OK"  # the Saver is still usable


def test_ranks_with_different_options_or_paths_write_nothing(disagree):
    directory, cases, _ = disagree
    assert same_error_on_every_rank(cases, "option") == (
        "InvalidArgumentError: Saver.save: the ranks disagree on write_state: rank(s) 0, 2 True, "
        "rank(s) 1 False; every rank must pass the same; nothing was written"
    )
    message = same_error_on_every_rank(cases, "path")
    assert message.startswith(
        "InvalidArgumentError: Saver.restore: the ranks disagree on path: rank(s) 0, 1 "
    )
    assert "ckpt-1', rank(s) 2 '" in message and message.endswith(
        "ckpt-9'; every rank must pass the same; nothing was written"
    )
    # a rank that cannot even make its prefix tells the others in their first step
    message = same_error_on_every_rank(cases, "step")
    assert message.startswith(
        f"InvalidArgumentError: saving {directory}/agree/ckpt-3 failed on rank(s) 1: rank 1: "
        "InvalidArgumentError: global_step must be an integer, got 'x'"
    )
    message = same_error_on_every_rank(cases, "cwd")
    assert message.startswith(
        "InvalidArgumentError: Saver.save: the ranks disagree on location: rank(s) 0 '/"
    )
    assert "cwd-0/rel/ckpt-5', rank(s) 1 '" in message and "cwd-2/rel/ckpt-5'; every rank" in message
    assert not any(os.listdir(os.path.join(directory, f"cwd-{rank}")) for rank in range(RANKS))
    message = same_error_on_every_rank(cases, "call")
    assert "the ranks are not in the same collective call: rank(s) 0, 1: Saver.save" in message
    assert "rank(s) 2: Saver.restore" in message


def test_replicas_that_differ_are_not_committed(disagree):
    directory, cases, files = disagree
    message = same_error_on_every_rank(cases, "differ")
    assert message.startswith("InvalidArgumentError: ")
    assert (
        "variable 'rng' differs between the ranks that hold it: rank(s) 0, 2 value A, rank(s) 1 value B"
        in message
    )
    assert "'shared'" not in message and "'rows'" not in message
    assert "leading rank axis" in message and "check_replicas=False" in message
    assert "ckpt.index" not in files["differ"] and "checkpoint" not in files["differ"]


def restored(prefix: str) -> dict[str, np.ndarray]:
    ss.reset_default_graph()
    variables = {
        "rows": ss.Variable("rows", dtype=np.float32, shape=(2 * RANKS, 4)),
        "shared": ss.Variable("shared", dtype=np.float64, shape=(3,)),
        "rng": ss.Variable("rng", dtype=np.int64, shape=(2,)),
        "per_rank": ss.Variable("per_rank", dtype=np.int64, shape=(RANKS, 2)),
    }
    ss.Saver(variables).restore(prefix)
    return {name: v.value for name, v in variables.items()}


def test_replicas_that_agree_save_fine(disagree):
    directory, cases, _ = disagree
    assert [cases[("equal", rank)] for rank in range(RANKS)] == ["OK"] * RANKS
    values = restored(os.path.join(directory, "replicas", "ckpt"))
    assert values["rng"].tolist() == [7, 1]
    assert values["shared"].tolist() == [0.0, 1.0, 2.0]
    assert values["rows"][:, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert values["per_rank"].tolist() == [[0, 0], [1, 10], [2, 20]]  # every rank's own row


def test_check_replicas_false_stores_one_ranks_copy(disagree):
    directory, cases, _ = disagree
    assert [cases[("unchecked", rank)] for rank in range(RANKS)] == ["OK"] * RANKS
    assert restored(os.path.join(directory, "unchecked", "ckpt"))["rng"].tolist() in ([7, 1], [8, 1])


def test_the_plan_lists_every_replicated_block_and_who_writes_it():
    from shardsave.plan import Block, BlockMeta, make_save_plan

    def meta(name, offset, shape, global_shape):
        return BlockMeta(name, 1, global_shape, Block(offset, shape), 4 * int(np.prod(shape)))

    whole = meta("w", (0,), (4,), (4,))
    top, bottom = meta("t", (0, 0), (2, 2), (4, 2)), meta("t", (2, 0), (2, 2), (4, 2))
    empty = meta("e", (0,), (0,), (0,))
    metas = [[top, whole, empty], [top, whole, empty], [bottom, whole, empty]]
    plan = make_save_plan(metas)
    assert plan.replicas == [("t", top.block), ("w", whole.block)]  # not the empty one
    holders, writers = {}, {}
    for rank, items in enumerate(plan.replica_items):
        for number, index, pos in items:
            assert metas[rank][index].name == plan.replicas[number][0]
            holders.setdefault(number, []).append(rank)
            if pos >= 0:  # this rank writes it: the write at pos is that item
                assert (plan.writes[rank][pos].name, plan.writes[rank][pos].index) == (
                    metas[rank][index].name,
                    index,
                )
                writers.setdefault(number, []).append(rank)
    assert holders == {0: [0, 1], 1: [0, 1, 2]}
    assert sorted(writers) == [0, 1] and all(len(ranks) == 1 for ranks in writers.values())


def test_the_coordinator_names_the_differing_block_and_ranks():
    from shardsave.plan import Block, SavePlan
    from shardsave.save.replicas import checked_replicas

    plan = SavePlan([[], [], []], {}, [("t", Block((2, 0), (2, 2))), ("w", Block((0,), (4,)))])
    gathered = [(b"p0", 1, [(0, 5), (1, 9)]), (b"p1", 2, [(0, 6), (1, 9)]), (b"p2", 3, [(1, 9)])]
    with pytest.raises(ss.InvalidArgumentError) as info:
        checked_replicas("/d/ck", plan, gathered)
    message = str(info.value)
    assert message.startswith(
        "saving /d/ck: variable 't' (block at offset [2, 0]) differs between the ranks that "
        "hold it: rank(s) 0 value A, rank(s) 1 value B; nothing was committed"
    )
    assert "'w'" not in message
    gathered[1] = (b"p1", 2, [(0, 5), (1, 9)])
    assert checked_replicas("/d/ck", plan, gathered) == [(b"p0", 1), (b"p1", 2), (b"p2", 3)]


@pytest.mark.parametrize("how", ["collect", "close", "with"])
def test_a_saver_frees_its_communicator(how, tmp_path):
    """2,200 Savers one after another on 2 ranks, each collected, closed or used as a
    context manager: more than MPICH's ~2,045 communicators, so each must free its
    duplicate; a Saver after them still saves and restores."""
    script = os.path.join(HERE, "ranks", "many_savers.py")
    proc = run_mpi(2, [script, "--dir", str(tmp_path), "--how", how], timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(re.findall(r"rank (\d) ok", proc.stdout)) == ["0", "1"]  # lines may interleave


def test_a_closed_saver_refuses_every_call(tmp_path):
    v = ss.Variable("w", np.arange(3.0))
    saver = ss.Saver([v])
    prefix = saver.save(str(tmp_path / "c"))
    saver.close()
    for call, args in (("save", (str(tmp_path / "d"),)), ("restore", (prefix,))):
        with pytest.raises(ss.FailedPreconditionError, match=rf"Saver\.{call}: this Saver is closed"):
            getattr(saver, call)(*args)
    assert not (tmp_path / "d.index").exists()


@pytest.mark.parametrize(
    "op, absent, waiting",
    [("bcast", 0, [1, 2]), ("gather", 1, [0]), ("allgather", 2, [0, 1]), ("scatter", 0, [1, 2])],
)
def test_a_rank_that_skips_a_pickled_collective_costs_the_others_the_timeout_not_a_hang(
    op, absent, waiting, tmp_path
):
    """shardsave's bcast, gather, allgather and scatter give every rank what it should get;
    when one rank (the root, or another) never makes the call, those that need its bytes
    (``waiting``) raise DeadlineExceededError after about the timeout, and refuse the Comm
    afterwards (a rank that needs nothing from it may return, as with MPI's own calls)."""
    script = os.path.join(HERE, "ranks", "collectives.py")
    proc = run_mpi(RANKS, [script, "--dir", str(tmp_path), "--op", op, "--absent", str(absent)], timeout=60)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    for rank in range(RANKS):
        lines = (tmp_path / f"rank-{rank}.out").read_text().splitlines()
        assert lines[:5] == ["ok bcast", "ok gather", "ok gathers", "ok allgather", "ok scatter"], (
            rank,
            lines,
            log,
        )
        assert len(lines) == (5 if rank == absent else 7), (rank, lines, log)
        if rank not in waiting:
            continue
        match = re.match(r"DeadlineExceededError after ([\d.]+) s: (.*)", lines[5])
        assert match, lines[5]
        assert TIMEOUT - 0.1 <= float(match.group(1)) < TIMEOUT + 5, lines[5]
        assert f"rank {rank} did not complete a" in match.group(2), lines[5]
        assert "within 2 s" in match.group(2), lines[5]
        assert lines[6].startswith("FailedPreconditionError after 0.0 s: "), lines[6]
        assert "unusable since an earlier collective step timed out" in lines[6], lines[6]
