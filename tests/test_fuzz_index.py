"""The standing fuzz suite of issue 11: crafted indexes (and data files) may only ever
give a ShardsaveError or values that agree with the bytes on disk, through every read and
restore path, without a crash, a hang or unbounded memory. The machinery is tests/fuzz/.

CI runs the saved corpus (the issue's examples) and a fixed set of hypothesis-generated
cases: ``derandomize=True`` so that every run tries the same cases (a red CI is a
regression in the code, never a lucky draw, and the failing case replays as is); the
random exploration is ``make fuzz``. Each finding fails the test and names a case file to
replay with ``python -m tests.fuzz.replay <file>``.
"""

from __future__ import annotations

import json
import os
import pickle
import signal

import pytest
from fuzz import mutate, oracle
from fuzz.engine import Fuzzer, corpus_cases
from fuzz.pool import Worker, WorkerDied
from hypothesis import HealthCheck, Phase, given, settings

CI_EXAMPLES = int(os.environ.get("FUZZ_CI_EXAMPLES", 200))
TARGET = os.environ.get("SHARDSAVE_FUZZ_TARGET")  # another source tree to test (default: this one)


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory):
    kwargs = {"target": os.path.abspath(TARGET)} if TARGET else {}
    with Fuzzer(out_dir=str(tmp_path_factory.mktemp("fuzz-findings")), **kwargs) as fz:
        yield fz


def _report(fz: Fuzzer, findings) -> str:
    distinct = {f.signature: fz.findings[f.signature] for f in findings}
    lines = [f"{len(distinct)} distinct findings:"]
    for f in distinct.values():
        lines += [
            f"- {f.line()}",
            f"    replay: python -m tests.fuzz.replay {fz.case_file(f)}",
            f"    case: {json.dumps(f.case)}",
        ]
    return "\n".join(lines)


def test_unmutated_seeds_read_and_restore_on_every_path(fuzzer):
    """The harness is not vacuous: every operation on every seed succeeds and its values
    agree with the reference."""
    for seed in mutate.SEED_NAMES:
        findings = fuzzer.run({"seed": seed, "muts": [], "fix_table": True, "fix_crc": "none"})
        assert not findings, _report(fuzzer, findings)
        ops = fuzzer.last_result["ops"]
        assert [op for op in ops if op["status"] != "ok"] == []
        assert {"restore:fresh", "restore:in_place", "restore:other", "restore:reshape"} <= {
            op["op"] for op in ops
        }


def test_the_oracle_rejects_bytes_that_fail_their_checksum(fuzzer):
    index, data = fuzzer.seed_files["big"]
    built = mutate.build_case(
        {"seed": "big", "muts": [["data", 0, "flip", 10]], "fix_table": True, "fix_crc": "none"}, index, data
    )
    ref = oracle.reference(built.index, {k: v for k, v in built.data.items()})
    assert ref["d"][0] == "bad" and "checksum" in ref["d"][1]
    assert ref["t"][0] == "ok"


def test_a_worker_killed_by_a_signal_is_a_finding(tmp_path):
    worker = Worker(cwd=str(tmp_path))
    spec = tmp_path / "spec.pkl"
    spec.write_bytes(pickle.dumps({"prefix": str(tmp_path / "none"), "layouts": [], "ref": None}))
    assert worker.run(str(spec))["ops"][0]["status"] == "error"  # NotFoundError: typed
    os.kill(worker.proc.pid, signal.SIGSEGV)
    with pytest.raises(WorkerDied) as died:
        worker.run(str(spec))
    assert (died.value.kind, died.value.detail) == ("signal", "SIGSEGV")
    worker.close()


def test_a_worker_that_stops_answering_is_a_hang(tmp_path):
    worker = Worker(cwd=str(tmp_path), timeout=1.0)
    spec = tmp_path / "spec.pkl"
    spec.write_bytes(pickle.dumps({"prefix": str(tmp_path / "none"), "layouts": [], "ref": None}))
    os.kill(worker.proc.pid, signal.SIGSTOP)  # not even its watchdog runs
    with pytest.raises(WorkerDied) as died:
        worker.run(str(spec))
    assert died.value.kind == "hang"
    worker.close()


@pytest.mark.parametrize("name,case", corpus_cases(), ids=[name for name, _ in corpus_cases()])
def test_corpus_case(fuzzer, name, case):
    findings = fuzzer.run(case)
    assert not findings, _report(fuzzer, findings)


def test_generated_crafted_checkpoints_give_only_typed_errors(fuzzer):
    findings = []

    @settings(
        max_examples=CI_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(mutate.cases())
    def one(case):
        findings.extend(fuzzer.run(case))

    one()
    assert not findings, _report(fuzzer, findings)
