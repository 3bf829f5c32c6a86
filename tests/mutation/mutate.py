"""A small mutation tester for shardsave's pure layers (run by hand; pytest never
collects it: the file name does not start with ``test_``).

Each mutant changes one operator, comparison, boolean or integer constant of one module
(or of one function of it), is written over the module in this tree, and the module's
fast tests are run with ``-x -q`` (Hypothesis: 25 derandomized examples where a test does
not set its own count); the original is put back after each. A mutant the
tests pass on survives and is listed.

    PYTHONPATH=$PWD .venv/bin/python tests/mutation/mutate.py shardsave/format/coding.py
    PYTHONPATH=$PWD .venv/bin/python tests/mutation/mutate.py shardsave/retention.py --function retain

Run it in a scratch worktree: it rewrites the module while it runs (Ctrl-C restores it).
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import signal
import sys
import time
from pathlib import Path

import hypothesis  # imported once here, not per mutant
import numpy  # noqa: F401
import pytest

ROOT = Path(__file__).resolve().parents[2]

# the fast tests that exercise each module directly
TESTS = {
    "shardsave/format/coding.py": ["tests/test_format.py", "tests/test_ordered_code.py"],
    "shardsave/format/ordered_code.py": ["tests/test_ordered_code.py"],
    "shardsave/format/state.py": ["tests/test_format.py", "-k", "state"],
    "shardsave/format/names.py": ["tests/test_names.py", "tests/test_format.py", "-k", "not s3"],
    "shardsave/plan.py": ["tests/test_plan.py"],
    "shardsave/checkpoint_state.py": [
        "tests/test_api.py",
        "tests/test_names.py",
        "-k",
        "latest or state or recover or relative or checkpoint or resolve or file_hint",
    ],
    "shardsave/retention.py": ["tests/test_api.py", "-k", "keep or max_to_keep or recover or retention"],
}

COMPARE = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
BINOP = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Add,
    ast.FloorDiv: ast.Mult,
    ast.Div: ast.Mult,
    ast.Mod: ast.FloorDiv,
    ast.LShift: ast.RShift,
    ast.RShift: ast.LShift,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
    ast.BitXor: ast.BitOr,
    ast.Pow: ast.Mult,
}


def skipped(tree: ast.AST) -> set[int]:
    """Nodes not worth mutating: docstrings, annotations (not evaluated), ``__all__``."""
    ids: set[int] = set()

    def mark(node):
        for n in ast.walk(node):
            ids.add(id(n))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs:
                if a.annotation:
                    mark(a.annotation)
            if node.returns:
                mark(node.returns)
        if isinstance(node, ast.AnnAssign):
            mark(node.annotation)
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            mark(node)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                mark(first)
    return ids


def sites(tree: ast.AST, function: str | None):
    """(path to a node, description, how to mutate a copy of it) for every mutation."""
    roots = [tree]
    if function:
        roots = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function]
    skip = skipped(tree)
    out = []
    for root in roots:
        for node in ast.walk(root):
            if id(node) in skip:
                continue
            line = getattr(node, "lineno", 0)
            if isinstance(node, ast.Compare):
                for i, op in enumerate(node.ops):
                    if type(op) in COMPARE:
                        out.append(
                            (
                                node,
                                line,
                                f"{type(op).__name__} -> {COMPARE[type(op)].__name__}",
                                lambda n, i=i: n.ops.__setitem__(i, COMPARE[type(n.ops[i])]()),
                            )
                        )
            elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in BINOP:
                new = BINOP[type(node.op)]
                out.append(
                    (
                        node,
                        line,
                        f"{type(node.op).__name__} -> {new.__name__}",
                        lambda n, new=new: setattr(n, "op", new()),
                    )
                )
            elif isinstance(node, ast.BoolOp):
                new = ast.Or if isinstance(node.op, ast.And) else ast.And
                out.append(
                    (
                        node,
                        line,
                        f"{type(node.op).__name__} -> {new.__name__}",
                        lambda n, new=new: setattr(n, "op", new()),
                    )
                )
            elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.Invert)):
                out.append((node, line, f"drop {type(node.op).__name__}", "unwrap"))
            elif isinstance(node, ast.Constant) and type(node.value) is bool:
                out.append(
                    (
                        node,
                        line,
                        f"{node.value} -> {not node.value}",
                        lambda n: setattr(n, "value", not n.value),
                    )
                )
            elif isinstance(node, ast.Constant) and type(node.value) is int:
                out.append(
                    (
                        node,
                        line,
                        f"{node.value} -> {node.value + 1}",
                        lambda n: setattr(n, "value", n.value + 1),
                    )
                )
    return out


def mutant_source(tree: ast.AST, target: ast.AST, how) -> str:
    """The module's source with ``how`` applied to (a copy of) ``target``."""
    memo: dict[int, ast.AST] = {}
    new_tree = copy.deepcopy(tree, memo)
    node = memo[id(target)]
    if how == "unwrap":
        for parent in ast.walk(new_tree):
            for field, value in ast.iter_fields(parent):
                if value is node:
                    setattr(parent, field, node.operand)
                elif isinstance(value, list) and any(v is node for v in value):
                    value[[i for i, v in enumerate(value) if v is node][0]] = node.operand
    else:
        how(node)
    return ast.unparse(ast.fix_missing_locations(new_tree))


def run_tests(args: list[str], timeout: float) -> str:
    """pytest in a forked child of this process (numpy, pytest and hypothesis are already
    imported here, shardsave is not, so the child imports the mutant afresh)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.chdir(ROOT)
            sys.path.insert(0, str(ROOT))
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            rc = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "--hypothesis-profile=mutation", *args])
        except BaseException:  # noqa: BLE001
            rc = 99
        os._exit(int(rc))
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "survived" if os.waitstatus_to_exitcode(status) == 0 else "killed"
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.05)


def main() -> int:
    sys.dont_write_bytecode = True  # a mutant of the same size and second must not reuse a .pyc
    # fewer examples (tests that set max_examples keep theirs), same ones every run
    hypothesis.settings.register_profile(
        "mutation", max_examples=25, derandomize=True, database=None, deadline=None
    )
    p = argparse.ArgumentParser()
    p.add_argument("module")
    p.add_argument("--function", help="mutate only this function of the module")
    p.add_argument("--lines", help="mutate only lines A-B")
    args = p.parse_args()
    path = ROOT / args.module
    original = path.read_text()
    tree = ast.parse(original)
    tests = TESTS[args.module]
    todo = sites(tree, args.function)
    if args.lines:
        lo, hi = map(int, args.lines.split("-"))
        todo = [s for s in todo if lo <= s[1] <= hi]
    start = time.time()
    path.write_text(ast.unparse(tree))  # the unparsed original must pass (it is the baseline)
    try:
        baseline = run_tests(tests, 900)
        took = time.time() - start
        assert baseline == "survived", f"the tests fail on the unmutated (unparsed) module: {baseline}"
        print(f"{args.module}: {len(todo)} mutants; baseline tests {took:.0f} s", flush=True)
        counts = {"killed": 0, "survived": 0, "timeout": 0}
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill PID: stop, restore, sum up
        try:
            for i, (node, line, what, how) in enumerate(todo, 1):
                path.write_text(mutant_source(tree, node, how))
                verdict = run_tests(tests, max(60.0, 3 * took))
                counts[verdict] += 1
                if verdict == "survived":
                    print(f"SURVIVED [{i}/{len(todo)}] {args.module}:{line}: {what}", flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    finally:
        path.write_text(original)
    print(
        f"{args.module}: {sum(counts.values())} of {len(todo)} tried, {counts['killed']} killed, "
        f"{counts['timeout']} timed out, {counts['survived']} survived ({time.time() - start:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
