"""Runs cases: builds each mutated checkpoint, hands it to the worker, classifies the
outcome, and keeps one case per distinct finding (saved as a replayable JSON file).

A finding's signature is what makes it distinct: its kind (exception, signal, hang, exit,
memory, wrong-value, accepted-bad, partial-write), the exception type or signal, and where
it happened (the innermost shardsave frame; for value findings the operation).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass, field

from . import mutate, oracle, seeds
from .pool import REPO, Worker, WorkerDied, crash_site

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


@dataclass
class Finding:
    signature: tuple[str, str, str]
    case: dict
    op: str
    msg: str
    detail: str = ""
    count: int = 1
    ops: set = field(default_factory=set)

    def line(self) -> str:
        kind, kind_type, where = self.signature
        return f"{kind} {kind_type} at {where} (x{self.count}; ops: {', '.join(sorted(self.ops)[:4])}): {self.msg[:160]}"


def _op_class(op: str) -> str:
    return op.split(":")[0] if not op.startswith("restore") else op.split(":")[0] + ":" + op.split(":")[1]


def layouts_as_data(seed: str) -> list[dict]:
    return [
        {
            "mode": lay.mode,
            "in_place": lay.in_place,
            "reshape": lay.reshape,
            "decls": [d._asdict() for d in lay.decls],
        }
        for lay in seeds.SPECS[seed]["layouts"]
    ]


class Fuzzer:
    """Seeds, a worker, and the findings so far. ``target``: the source tree whose
    ``shardsave`` the worker imports (the seeds and mutations use the harness's own)."""

    def __init__(
        self,
        target: str = REPO,
        timeout: float = 20.0,
        as_limit: int = 3 << 30,
        rss_bound: int = 512 << 20,
        out_dir: str | None = None,
    ):
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.root = tempfile.mkdtemp(prefix="shardsave-fuzz-", dir=base)
        self.target, self.timeout, self.as_limit, self.rss_bound = target, timeout, as_limit, rss_bound
        self.out_dir = out_dir
        self.seed_dirs = seeds.build_seeds(os.path.join(self.root, "seeds"))
        self.seed_files = {seed: self._read_seed(d) for seed, d in self.seed_dirs.items()}
        self.layouts = {seed: layouts_as_data(seed) for seed in seeds.SEED_NAMES}
        self.findings: dict[tuple[str, str, str], Finding] = {}
        self.cases = self.restarts = 0
        self.worker: Worker | None = None
        self.last_result: dict | None = None

    @staticmethod
    def _read_seed(directory: str) -> tuple[bytes, dict[str, bytes]]:
        files = {}
        for name in sorted(os.listdir(directory)):
            with open(os.path.join(directory, name), "rb") as f:
                files[name] = f.read()
        index = files.pop(seeds.PREFIX + ".index")
        return index, files

    def _worker(self) -> Worker:
        if self.worker is None:
            self.worker = Worker(self.target, self.as_limit, self.timeout, self.rss_bound, cwd=self.root)
            self.restarts += 1
        return self.worker

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Fuzzer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ one case
    def prepare(self, case: dict) -> str:
        """Write a case's files and the worker's spec; the spec's path."""
        index, data = self.seed_files[case["seed"]]
        built = mutate.build_case(case, index, data)
        case_dir = os.path.join(self.root, "case")
        shutil.rmtree(case_dir, ignore_errors=True)
        built.write(case_dir, self.seed_dirs[case["seed"]])
        files = {name: (data[name] if content is None else content) for name, content in built.data.items()}
        spec = {
            "prefix": os.path.join(case_dir, seeds.PREFIX),
            "layouts": self.layouts[case["seed"]],
            "ref": oracle.reference(built.index, files),
        }
        path = os.path.join(self.root, "spec.pkl")
        with open(path, "wb") as f:
            pickle.dump(spec, f)
        return path

    def run(self, case: dict) -> list[Finding]:
        """Run one case; its findings (also recorded in ``self.findings``)."""
        path = self.prepare(case)
        self.cases += 1
        found: list[Finding] = []
        self.last_result = None
        try:
            result = self._worker().run(path)
        except WorkerDied as died:
            self.worker.close()
            self.worker = None
            where = crash_site(died.stderr)
            found.append(
                Finding(
                    (died.kind, died.detail.split(" ")[0], where),
                    case,
                    died.op,
                    f"worker {died.kind} ({died.detail}) during {died.op}",
                    died.stderr[-4000:],
                )
            )
            return self._record(found)
        self.last_result = result
        for op in result["ops"]:
            if op["status"] != "finding":
                continue
            sig = _signature(op)
            found.append(Finding(sig, case, op["op"], op.get("msg", ""), op.get("tb", "")))
            if op["kind"] == "memory" and self.worker is not None:  # the peak RSS never comes down
                self.worker.close()
                self.worker = None
        return self._record(found)

    def _record(self, found: list[Finding]) -> list[Finding]:
        for f in found:
            known = self.findings.get(f.signature)
            if known is None:
                f.ops.add(_op_class(f.op))
                self.findings[f.signature] = f
                self._save(f)
            else:
                known.count += 1
                known.ops.add(_op_class(f.op))
                if _size(f.case) < _size(known.case):  # keep the simplest case as the reproducer
                    known.case, known.op, known.msg, known.detail = f.case, f.op, f.msg, f.detail
                    self._save(known)
        return found

    # ------------------------------------------------------------------ reporting
    def case_file(self, f: Finding) -> str | None:
        if self.out_dir is None:
            return None
        digest = hashlib.sha1(repr(f.signature).encode()).hexdigest()[:8]
        name = re.sub(r"[^A-Za-z0-9]+", "-", f"{f.signature[0]}-{f.signature[1]}-{f.signature[2]}").strip("-")
        return os.path.join(self.out_dir, f"{name[:70]}-{digest}.json")

    def _save(self, f: Finding) -> None:
        path = self.case_file(f)
        if path is None:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        with open(path, "w") as out:
            json.dump(
                {
                    "signature": list(f.signature),
                    "op": f.op,
                    "msg": f.msg,
                    "case": f.case,
                    "detail": f.detail[-3000:],
                },
                out,
                indent=1,
            )
            out.write("\n")

    def report(self) -> str:
        lines = [
            f"{self.cases} cases against {self.target}/shardsave, {len(self.findings)} distinct findings, "
            f"{self.restarts} worker starts"
        ]
        for f in sorted(self.findings.values(), key=lambda f: f.signature):
            lines.append("- " + f.line())
            path = self.case_file(f)
            replay = f"python -m tests.fuzz.replay {path}" if path else "case: " + json.dumps(f.case)
            lines.append(f"    replay: {replay}")
        return "\n".join(lines)


def _signature(op: dict) -> tuple[str, str, str]:
    """Exceptions by type and place; value findings by what the oracle objected to (the
    same bug shows in every path that shares the code), with numbers and names elided."""
    if op["kind"] in ("accepted-bad", "wrong-value"):
        reason = op["msg"].split(" although ")[-1] if op["kind"] == "accepted-bad" else "values differ"
        return op["kind"], re.sub(r"'[^']*'|\[[^\]]*\]|\(.*?\)|-?\d+", "N", reason)[:80], "read/restore"
    if op["kind"] in ("memory", "partial-write"):
        return op["kind"], op["type"], _op_class(op["op"])
    return op["kind"], op["type"], op["where"]


def _size(case: dict) -> int:
    return len(json.dumps(case["muts"]))


def load_case_file(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    return data.get("case", data)


def corpus_cases() -> list[tuple[str, dict]]:
    """The saved cases under corpus/ (the issue's examples and past findings)."""
    if not os.path.isdir(CORPUS):
        return []
    return [
        (name, load_case_file(os.path.join(CORPUS, name)))
        for name in sorted(os.listdir(CORPUS))
        if name.endswith(".json")
    ]
