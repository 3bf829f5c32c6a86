"""The training examples under real mpiexec: trained on N ranks, resumed on M, they end with
the bits of a straight run on one rank (README, "The manager loop"; examples/*.py docstrings).

Each example is launched three times (few steps, small models: a launch is most of the
cost). Before ss.CheckpointManager exists the tests skip, saying so.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from faults.common import MPIEXEC, REPO, run_mpi

import shardsave as ss
from shardsave.format.names import METADATA_NAME

SHA = re.compile(r"final step (\d+) parameters sha256 ([0-9a-f]{64})")

pytestmark = pytest.mark.skipif(
    not hasattr(ss, "CheckpointManager"), reason="ss.CheckpointManager is not merged yet (issue 13)"
)


def run_example(script: str, n: int, ckpt_dir: str, steps: int, *extra: str) -> tuple[str, str]:
    """Run examples/<script> on ``n`` ranks; its stdout and the final parameters' sha256."""
    args = [os.path.join(REPO, "examples", script), "--ckpt-dir", ckpt_dir, "--steps", str(steps), *extra]
    proc = run_mpi(n, args, timeout=180)
    assert proc.returncode == 0, f"{script} on {n} ranks:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    m = SHA.search(proc.stdout)
    assert m and int(m.group(1)) == steps, proc.stdout[-3000:]
    return proc.stdout, m.group(2)


def metadata(prefix: str) -> dict:
    return json.loads(ss.CheckpointReader(prefix).get_tensor(METADATA_NAME).item())


def test_mpi_train_resumed_on_fewer_ranks_equals_straight_run(tmp_path):
    run, straight = str(tmp_path / "run"), str(tmp_path / "straight")
    flags = ("--save-every", "3", "--max-to-keep", "2")
    out4, sha4 = run_example("mpi_train.py", 4, run, 6, *flags)
    assert f"saved {run}/model.ckpt-6" in out4
    out2, sha2 = run_example("mpi_train.py", 2, run, 12, *flags, "--resume")
    assert f"resumed from {run}/model.ckpt-6 at step 6 on 2 ranks" in out2
    _, sha1 = run_example("mpi_train.py", 1, straight, 12, *flags)
    assert sha2 == sha1 != sha4
    # TF2's layout; retention went on across the restart: the 4-rank run's 3 and 6 are gone
    assert ss.latest_checkpoint(run) == f"{run}/model.ckpt-12"
    indexes = sorted(f for f in os.listdir(run) if f.endswith(".index"))
    assert indexes == ["model.ckpt-12.index", "model.ckpt-9.index"]
    assert sorted(f for f in os.listdir(run) if ".data-" in f) == [
        f"model.ckpt-{s}.data-{r:05d}-of-00002" for s in (12, 9) for r in range(2)
    ]
    meta = metadata(f"{run}/model.ckpt-12")
    assert meta["ranks"] == 2 and meta["config"]["vocab"] == 1000


def test_mpi_train_refuses_a_checkpoint_of_another_config(tmp_path):
    run = str(tmp_path / "run")
    run_example("mpi_train.py", 1, run, 2, "--save-every", "2")
    args = [os.path.join(REPO, "examples", "mpi_train.py"), "--ckpt-dir", run, "--steps", "4"]
    proc = run_mpi(1, [*args, "--resume", "--lr", "0.25"], timeout=120)
    assert proc.returncode != 0
    assert "was trained with" in proc.stderr and "'lr': 0.5" in proc.stderr, proc.stderr[-3000:]


def test_torch_train_resumed_on_more_ranks_equals_straight_run(tmp_path):
    pytest.importorskip("torch", reason="PyTorch is not installed (the frameworks extra)")
    run, straight = str(tmp_path / "run"), str(tmp_path / "straight")
    flags = ("--save-every", "4")
    # 1 -> 2 ranks (4 torch processes in all: each costs seconds to import torch)
    out1, sha_half = run_example("torch_train.py", 1, run, 8, *flags)
    out2, sha2 = run_example("torch_train.py", 2, run, 16, *flags, "--resume")
    assert f"resumed from {run}/ckpt-8 at step 8 on 2 ranks" in out2
    _, sha1 = run_example("torch_train.py", 1, straight, 16, *flags)
    # equal only if Adam's moments and step came back too: the parameters alone would not do
    assert sha2 == sha1 != sha_half
    names = dict(ss.list_variables(f"{run}/ckpt-16"))
    assert "model/0.weight" in names and names["model/0.weight"] == [32, 16]
    assert any(n.startswith("optimizer/state/") and n.endswith("exp_avg_sq") for n in names), names


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in sorted(children.get(todo.pop(0), [])):
            out.append(child)
            todo.append(child)
    return out


def _is_rank(pid: int) -> bool:
    try:
        return b"mpi_train.py" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _environ(pid: int) -> dict[str, str]:
    items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in items if b"=" in item)


def test_mpi_train_preempted_by_sigterm_to_one_rank_saves_and_resumes_bit_exact(tmp_path):
    if not os.path.exists("/proc/self/stat"):
        pytest.skip("finds the ranks through /proc")
    run, straight = str(tmp_path / "run"), str(tmp_path / "straight")
    script = os.path.join(REPO, "examples", "mpi_train.py")
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py", script, "--ckpt-dir", run]
    cmd += ["--steps", "1000000", "--save-every", "1000000"]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        for line in proc.stdout:  # rank 0 prints every 20 steps: the loop is running
            if " loss " in line:
                break
        ranks = {_environ(p).get("PMI_RANK"): p for p in _descendants(proc.pid) if _is_rank(p)}
        assert set(ranks) == {"0", "1"}, ranks
        os.kill(ranks["1"], signal.SIGTERM)  # one rank only, not the coordinator
        out, err = proc.communicate(timeout=120)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    m = re.search(r"preempted at step (\d+)", out)
    assert m, out[-3000:]
    step = int(m.group(1))
    assert ss.latest_checkpoint(run) == f"{run}/model.ckpt-{step}"  # the same step, saved by both
    assert sorted(f for f in os.listdir(run) if ".data-" in f) == [
        f"model.ckpt-{step}.data-{r:05d}-of-00002" for r in range(2)
    ]
    _, resumed = run_example("mpi_train.py", 1, run, step + 3, "--resume", "--save-every", "1000")
    _, straight_sha = run_example("mpi_train.py", 1, straight, step + 3, "--save-every", "1000")
    assert resumed == straight_sha
