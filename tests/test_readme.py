"""The README's code runs as written.

A python block right after a marker comment

    <!-- runnable: ranks=N needs=NAME expect="REGEX" -->

is run on its own in a fresh directory: under ``mpiexec -n N python -m mpi4py`` when
``ranks`` is given, else with plain python; ``needs`` names an attribute of ``shardsave``
without which the block is skipped (a part not merged yet); ``expect`` is a regular
expression its output must match. Every python block that imports mpi4py must be marked,
so that the MPI snippets a user copies are the ones that run here.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from faults.common import REPO, run_group, run_mpi

import shardsave as ss

README = os.path.join(REPO, "README.md")
MARKER = re.compile(r"<!--\s*runnable:(?P<options>[^>]*?)-->\s*\n```python\n(?P<code>.*?)```", re.S)
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


@dataclass
class Snippet:
    line: int
    code: str
    ranks: int | None
    needs: str | None
    expect: str | None

    @property
    def id(self) -> str:
        return f"README.md:{self.line}"


def snippets(text: str) -> list[Snippet]:
    found = []
    for m in MARKER.finditer(text):
        options = dict(item.split("=", 1) for item in shlex.split(m.group("options")))
        unknown = set(options) - {"ranks", "needs", "expect"}
        assert not unknown, f"README.md: unknown runnable option(s) {sorted(unknown)}"
        found.append(
            Snippet(
                line=text.count("\n", 0, m.start("code")) + 1,
                code=m.group("code"),
                ranks=int(options["ranks"]) if "ranks" in options else None,
                needs=options.get("needs"),
                expect=options.get("expect"),
            )
        )
    return found


TEXT = Path(README).read_text(encoding="utf-8")
SNIPPETS = snippets(TEXT)


def test_the_markers_are_found():
    assert len(SNIPPETS) >= 2
    assert any("CheckpointManager(" in s.code for s in SNIPPETS), "the manager loop is not runnable"
    assert any(s.ranks and "ss.Saver(comm=comm)" in s.code for s in SNIPPETS), (
        "the MPI snippet is not runnable"
    )


def test_every_mpi_block_is_runnable():
    marked = {s.code for s in SNIPPETS}
    unmarked = [
        TEXT.count("\n", 0, m.start(1)) + 1
        for m in PYTHON_BLOCK.finditer(TEXT)
        if "mpi4py" in m.group(1) and m.group(1) not in marked
    ]
    assert not unmarked, (
        f"README.md: python blocks importing mpi4py without a runnable marker, lines {unmarked}"
    )


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda s: s.id)
def test_snippet_runs(snippet: Snippet, tmp_path):
    if snippet.needs and not hasattr(ss, snippet.needs):
        pytest.skip(f"ss.{snippet.needs} is not merged yet (issue 13)")
    script = tmp_path / "snippet.py"
    # in a directory of its own: the snippets use relative directories
    script.write_text(f"import os\nos.chdir({str(tmp_path)!r})\n{snippet.code}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    if snippet.ranks:
        proc = run_mpi(snippet.ranks, [str(script)], env=env, timeout=120)
    else:
        proc = run_group([sys.executable, str(script)], env=env, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{snippet.id} failed:\n{out[-4000:]}"
    if snippet.expect:
        assert re.search(snippet.expect, proc.stdout), (
            f"{snippet.id}: no {snippet.expect!r} in\n{out[-4000:]}"
        )


LAUNCH = re.compile(r"\b(?:mpiexec|mpirun|srun)\b[^\n]*?\bpython3?\b(?P<after>[^\n]*)")


def test_every_launch_line_uses_python_m_mpi4py():
    """README, examples/ and deploy/: every MPI launch runs ``python -m mpi4py`` (see the
    README for why); tests/test_deploy.py checks deploy/'s structured files too."""
    files = [Path(README), *Path(REPO, "examples").glob("*.py")]
    files += [p for p in Path(REPO, "deploy").rglob("*") if p.is_file()]
    bad, seen = [], 0
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in LAUNCH.finditer(re.sub(r"[\"',]", " ", line)):  # exec-form JSON too
                seen += 1
                if not re.match(r"\s*-m\s+mpi4py\b", m.group("after")):
                    bad.append(f"{Path(path).relative_to(REPO)}:{number}: {line.strip()}")
    assert seen >= 10
    assert not bad, "\n".join(bad)
