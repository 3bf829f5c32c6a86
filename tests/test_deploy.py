"""Static checks of the deployment files under deploy/.

CI has no Docker engine, Slurm or Kubernetes, so these files are never
executed there. Instead this module parses them and checks that what they
run exists: the YAML structure (MPIJob, Secret, Compose), that every
``examples/<x>.py`` they start is in the repository and accepts the flags
passed to it, that every ``shardsave <sub>`` they call is a real CLI
subcommand, and that the Slurm script is valid bash.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY = REPO_ROOT / "deploy"
SBATCH = DEPLOY / "slurm" / "train.sbatch"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "docker" / "docker-compose.yml"
MPIJOB = DEPLOY / "kubernetes" / "mpijob.yaml"
SECRET = DEPLOY / "kubernetes" / "s3-secret.yaml"
README = DEPLOY / "README.md"

TRAIN_SCRIPT = "examples/mpi_train.py"
IMAGE = "shardsave:latest"

# A token naming an example script, e.g. "examples/mpi_train.py" or
# "/app/examples/mpi_train.py" (the Dockerfile copies the repo to /app).
EXAMPLE_TOKEN_RE = re.compile(r"(?:^|/)examples/([\w.-]+\.py)$")
# Shell command separators; commands are split on these before tokenizing.
SEPARATOR_RE = re.compile(r"&&|\|\||[;|\n]")
MPI_LAUNCHERS = {"mpiexec", "mpirun", "srun"}


# --------------------------------------------------------------------------
# Extracting command lines from the deployment files
# --------------------------------------------------------------------------


def _yaml_files() -> list[Path]:
    return sorted({*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")})


def _shell_files() -> list[Path]:
    return sorted({*DEPLOY.rglob("*.sbatch"), *DEPLOY.rglob("*.sh")})


def _dockerfiles() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("Dockerfile*") if p.suffix != ".dockerignore")


def _load_yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    raise TypeError(f"unexpected command value {value!r}")


def _yaml_commands(node: Any) -> list[str]:
    """Command lines in a YAML tree: entrypoint + command + args of a mapping."""
    found: list[str] = []
    if isinstance(node, dict):
        parts = [_as_text(node.get(k)) for k in ("entrypoint", "command", "args")]
        text = " ".join(p for p in parts if p)
        if text:
            found.append(text)
        for value in node.values():
            found.extend(_yaml_commands(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_yaml_commands(value))
    return found


def _shell_lines(text: str) -> list[str]:
    """Logical shell lines: continuations joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    lines = []
    for raw in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if line:
            lines.append(line)
    return lines


def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; exec-form JSON arrays joined by spaces."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        match = re.match(r"\s*([A-Za-z]+)\s+(.*)$", line)
        if not match:
            continue
        instruction, body = match.group(1).upper(), match.group(2).strip()
        if instruction in {"RUN", "CMD", "ENTRYPOINT"} and body.startswith("["):
            body = " ".join(json.loads(body))
        result.append((instruction, body))
    return result


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", README.read_text(), re.DOTALL)
    return [line for block in blocks for line in _shell_lines(block)]


def _commands_by_source() -> dict[str, list[str]]:
    """Every command line in deploy/, keyed by the file it comes from."""
    commands: dict[str, list[str]] = {}
    for path in _yaml_files():
        commands[_rel(path)] = [c for doc in _load_yaml(path) for c in _yaml_commands(doc)]
    for path in _shell_files():
        commands[_rel(path)] = _shell_lines(path.read_text())
    for path in _dockerfiles():
        commands[_rel(path)] = [
            body
            for instruction, body in _dockerfile_instructions(path.read_text())
            if instruction in {"RUN", "CMD", "ENTRYPOINT"}
        ]
    if README.exists():
        commands[_rel(README)] = _readme_commands()
    return commands


def _rel(path: Path) -> str:
    return path.relative_to(REPO_ROOT).as_posix()


def _segments(text: str) -> list[list[str]]:
    """Split a command line into simple commands, each a list of tokens."""
    result = []
    for segment in SEPARATOR_RE.split(text):
        tokens = [t.strip("\"'`") for t in segment.split()]
        tokens = [t for t in tokens if t]
        if tokens:
            result.append(tokens)
    return result


@dataclass
class ExampleRun:
    source: str
    prefix: list[str]  # tokens before the script (launcher, python, ...)
    script: str  # e.g. "examples/mpi_train.py"
    args: list[str]  # tokens after the script

    @property
    def flags(self) -> set[str]:
        return {a.split("=", 1)[0] for a in self.args if a.startswith("--")}

    def option(self, name: str) -> str | None:
        for i, arg in enumerate(self.args):
            if arg == name and i + 1 < len(self.args):
                return self.args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
        return None

    @property
    def launcher(self) -> str | None:
        """The MPI launcher in front of the script (sh -c wrappers skipped)."""
        for token in self.prefix:
            if token.rsplit("/", 1)[-1] in MPI_LAUNCHERS:
                return token.rsplit("/", 1)[-1]
        return None

    @property
    def nranks(self) -> int | None:
        for i, token in enumerate(self.prefix[:-1]):
            if token in {"-n", "-np"}:
                return int(self.prefix[i + 1])
        return None


def _runs_in(source: str, texts: list[str]) -> list[ExampleRun]:
    """Every start of an examples/*.py script in the given command lines."""
    runs = []
    for text in texts:
        for tokens in _segments(text):
            for i, token in enumerate(tokens):
                match = EXAMPLE_TOKEN_RE.search(token)
                if match:
                    script = f"examples/{match.group(1)}"
                    runs.append(ExampleRun(source, tokens[:i], script, tokens[i + 1 :]))
                    break
    return runs


def _example_runs(source: str | None = None) -> list[ExampleRun]:
    return [
        run
        for src, texts in _commands_by_source().items()
        if source is None or src == source
        for run in _runs_in(src, texts)
    ]


def _shardsave_calls() -> list[tuple[str, list[str]]]:
    """(source, tokens after `shardsave`) for every shardsave CLI call."""
    calls = []
    for src, texts in _commands_by_source().items():
        for text in texts:
            for tokens in _segments(text):
                for i, token in enumerate(tokens):
                    if token == "shardsave" or token.endswith("/bin/shardsave"):
                        calls.append((src, tokens[i + 1 :]))
                        break
    return calls


# --------------------------------------------------------------------------
# YAML structure
# --------------------------------------------------------------------------


def test_deploy_files_present() -> None:
    for path in (SBATCH, DOCKERFILE, COMPOSE, MPIJOB, SECRET, README):
        assert path.is_file(), f"missing {_rel(path)}"


@pytest.mark.parametrize("path", _yaml_files(), ids=_rel)
def test_yaml_parses_to_mappings(path: Path) -> None:
    docs = _load_yaml(path)
    assert docs, f"{_rel(path)} has no YAML documents"
    for doc in docs:
        assert isinstance(doc, dict), f"{_rel(path)}: top level is not a mapping"


def _mpijob() -> dict[str, Any]:
    jobs = [d for d in _load_yaml(MPIJOB) if d.get("kind") == "MPIJob"]
    assert len(jobs) == 1, "mpijob.yaml must hold exactly one MPIJob"
    return jobs[0]


def _containers(replica: dict[str, Any]) -> list[dict[str, Any]]:
    return replica["template"]["spec"]["containers"]


def test_mpijob_structure() -> None:
    job = _mpijob()
    assert job["apiVersion"] == "kubeflow.org/v2beta1"
    assert job["metadata"]["name"]
    specs = job["spec"]["mpiReplicaSpecs"]
    assert set(specs) == {"Launcher", "Worker"}
    assert specs["Launcher"].get("replicas", 1) == 1
    assert specs["Worker"]["replicas"] >= 1
    for role, replica in specs.items():
        containers = _containers(replica)
        assert containers, f"{role} has no containers"
        for container in containers:
            assert container["image"] == IMAGE, f"{role} image"


def test_mpijob_launcher_runs_training_with_resume_on_s3() -> None:
    job = _mpijob()
    launcher = job["spec"]["mpiReplicaSpecs"]["Launcher"]
    runs = _runs_in(_rel(MPIJOB), _yaml_commands(_containers(launcher)))
    assert len(runs) == 1, "the Launcher must start examples/mpi_train.py once"
    run = runs[0]
    assert run.script == TRAIN_SCRIPT
    assert run.launcher == "mpirun"
    assert (run.option("--ckpt-dir") or "").startswith("s3://")
    assert "--resume" in run.flags
    # mpirun -n must fit into the slots the workers provide.
    spec = job["spec"]
    slots = spec["mpiReplicaSpecs"]["Worker"]["replicas"] * spec.get("slotsPerWorker", 1)
    assert run.nranks is not None, "mpirun needs an explicit -n"
    assert run.nranks <= slots, f"mpirun -n {run.nranks} > {slots} worker slots"


def _secret_refs(node: Any) -> list[tuple[str, str | None, bool]]:
    """(secret name, key or None for envFrom, optional) references in a tree."""
    refs: list[tuple[str, str | None, bool]] = []
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            ref = node["secretKeyRef"]
            refs.append((ref["name"], ref["key"], bool(ref.get("optional", False))))
        if "secretRef" in node:
            ref = node["secretRef"]
            refs.append((ref["name"], None, bool(ref.get("optional", False))))
        for value in node.values():
            refs.extend(_secret_refs(value))
    elif isinstance(node, list):
        for value in node:
            refs.extend(_secret_refs(value))
    return refs


def _secrets() -> dict[str, dict[str, Any]]:
    secrets = {}
    for doc in _load_yaml(SECRET):
        if doc.get("kind") == "Secret":
            assert doc["apiVersion"] == "v1"
            secrets[doc["metadata"]["name"]] = doc
    return secrets


def test_mpijob_secret_references_exist() -> None:
    secrets = _secrets()
    assert secrets, "s3-secret.yaml defines no Secret"
    refs = _secret_refs(_mpijob())
    assert refs, "the MPIJob takes no credentials from a Secret"
    for name, key, optional in refs:
        assert name in secrets, f"Secret {name!r} is not defined in s3-secret.yaml"
        secret = secrets[name]
        keys = {**secret.get("data", {}), **secret.get("stringData", {})}
        if key is not None and not optional:
            assert key in keys, f"Secret {name!r} has no key {key!r}"


def test_mpijob_every_container_gets_s3_credentials() -> None:
    for role, replica in _mpijob()["spec"]["mpiReplicaSpecs"].items():
        for container in _containers(replica):
            env_refs = {
                e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})
            }
            for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert var in env_refs, f"{role} does not get {var} from a Secret"


def test_secret_values_are_placeholders() -> None:
    for name, secret in _secrets().items():
        values = secret.get("stringData", {})
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert key in values, f"Secret {name!r} lacks {key}"
            assert "REPLACE" in str(values[key]), (
                f"Secret {name!r}: {key} must stay a placeholder in the repository"
            )


# --------------------------------------------------------------------------
# Docker Compose
# --------------------------------------------------------------------------


def _compose_services() -> dict[str, dict[str, Any]]:
    (doc,) = _load_yaml(COMPOSE)
    return doc["services"]


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (cfg or {}).get("condition", "service_started") for name, cfg in deps.items()}


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def _bucket_job(services: dict[str, dict[str, Any]]) -> str:
    jobs = [n for n, s in services.items() if str(s.get("image", "")).startswith("minio/mc")]
    assert len(jobs) == 1, "expected one minio/mc service that creates the bucket"
    return jobs[0]


def _compose_run(service: str) -> ExampleRun:
    runs = _runs_in(_rel(COMPOSE), _yaml_commands(_compose_services()[service]))
    assert len(runs) == 1, f"compose service {service!r} must run one example"
    return runs[0]


def test_compose_minio_and_bucket_job() -> None:
    services = _compose_services()
    assert {"minio", "train"} <= set(services)
    minio = services["minio"]
    assert str(minio["image"]).startswith("minio/minio")
    assert "server /data" in _as_text(minio["command"])
    assert minio["healthcheck"]["test"], "minio needs a healthcheck"
    job = services[_bucket_job(services)]
    assert _depends_on(job).get("minio") == "service_healthy"
    assert re.search(r"\bmc mb\b", " ".join(_yaml_commands(job))), "bucket job runs no `mc mb`"


def test_compose_train_service() -> None:
    services = _compose_services()
    train = services["train"]
    deps = _depends_on(train)
    assert deps.get("minio") == "service_healthy"
    assert deps.get(_bucket_job(services)) == "service_completed_successfully"

    build = train["build"]
    context = COMPOSE.parent / build["context"]
    assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE.resolve()

    env = _environment(train)
    assert env.get("AWS_ENDPOINT_URL") == "http://minio:9000"
    assert env.get("AWS_ACCESS_KEY_ID")
    assert env.get("AWS_SECRET_ACCESS_KEY")

    run = _compose_run("train")
    assert run.script == TRAIN_SCRIPT
    assert run.launcher == "mpiexec"
    assert run.nranks == 2
    url = run.option("--ckpt-dir") or ""
    assert url.startswith("s3://"), "train must checkpoint to S3 (MinIO)"
    bucket = url.removeprefix("s3://").split("/", 1)[0]
    job_commands = " ".join(_yaml_commands(services[_bucket_job(services)]))
    assert re.search(rf"/{re.escape(bucket)}\b", job_commands), (
        f"the bucket job does not create bucket {bucket!r}"
    )


def test_compose_resume_uses_other_rank_count() -> None:
    services = _compose_services()
    assert "resume" in services
    assert _environment(services["resume"]) == _environment(services["train"])
    train, resume = _compose_run("train"), _compose_run("resume")
    assert resume.option("--ckpt-dir") == train.option("--ckpt-dir")
    assert "--resume" in resume.flags
    assert resume.nranks is not None
    assert resume.nranks != train.nranks


# --------------------------------------------------------------------------
# Dockerfile and Slurm script
# --------------------------------------------------------------------------


def test_dockerfile() -> None:
    instructions = _dockerfile_instructions(DOCKERFILE.read_text())
    froms = [body for ins, body in instructions if ins == "FROM"]
    assert froms, "Dockerfile has no FROM"
    assert froms[0].split()[0] == "python:3.11-slim"
    workdirs = [body for ins, body in instructions if ins == "WORKDIR"]
    assert workdirs, "Dockerfile has no WORKDIR"
    assert workdirs[-1] == "/app"
    copies = [body.split() for ins, body in instructions if ins == "COPY"]
    assert any(c[0] == "." and c[-1] in {"/app", ".", "/app/"} for c in copies)
    runs = [body for ins, body in instructions if ins == "RUN"]
    assert any(re.search(r"pip install .*\.\[s3,mpi\]", r) for r in runs)
    cmds = [body for ins, body in instructions if ins == "CMD"]
    assert cmds, "Dockerfile has no CMD"
    assert TRAIN_SCRIPT in cmds[-1]


def test_sbatch_bash_syntax() -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not available")
    result = subprocess.run([bash, "-n", str(SBATCH)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_sbatch_directives() -> None:
    lines = SBATCH.read_text().splitlines()
    assert lines[0].startswith("#!"), "batch script needs a shebang"
    directives: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        if line.startswith("#SBATCH"):
            opt = line.split()[1]
            key, _, value = opt.lstrip("-").partition("=")
            directives[key] = value
            # sbatch stops reading #SBATCH lines at the first command.
            code_before = [ln for ln in lines[1 : number - 1] if ln.strip() and not ln.startswith("#")]
            assert not code_before, f"#SBATCH on line {number} comes after a command"
    for key in ("nodes", "time", "output", "requeue"):
        assert key in directives, f"missing #SBATCH --{key}"
    assert "ntasks" in directives or "ntasks-per-node" in directives


def test_sbatch_runs_training_with_resume_and_lists() -> None:
    runs = _example_runs(_rel(SBATCH))
    assert len(runs) == 1
    run = runs[0]
    assert run.script == TRAIN_SCRIPT
    assert run.launcher == "srun"
    assert run.option("--ckpt-dir") == "$CKPT_DIR"
    assert "--resume" in run.flags
    calls = [tokens for src, tokens in _shardsave_calls() if src == _rel(SBATCH)]
    assert ["ls", "$CKPT_DIR"] in [tokens[:2] for tokens in calls]


# --------------------------------------------------------------------------
# What the files run exists in the repository
# --------------------------------------------------------------------------


def test_every_deploy_file_runs_the_training_example() -> None:
    sources = {run.source for run in _example_runs() if run.script == TRAIN_SCRIPT}
    for path in (SBATCH, DOCKERFILE, COMPOSE, MPIJOB):
        assert _rel(path) in sources, f"{_rel(path)} does not run {TRAIN_SCRIPT}"


def test_example_scripts_exist() -> None:
    runs = _example_runs()
    assert runs
    missing = sorted({f"{r.script} (from {r.source})" for r in runs if not (REPO_ROOT / r.script).is_file()})
    assert not missing, f"scripts run by deploy/ but missing from the repo: {missing}"


def test_example_flags_are_accepted() -> None:
    flags_by_script: dict[str, set[str]] = {}
    for run in _example_runs():
        flags_by_script.setdefault(run.script, set()).update(run.flags)
    assert flags_by_script.get(TRAIN_SCRIPT), "no flags passed to the training example"
    for script, flags in sorted(flags_by_script.items()):
        path = REPO_ROOT / script
        if not path.is_file():
            pytest.skip(f"{script} does not exist yet")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        result = subprocess.run(
            [sys.executable, script, "--help"],
            check=False,
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"{script} --help failed:\n{result.stderr}"
        unknown = sorted(
            f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", result.stdout)
        )
        assert not unknown, f"{script} --help does not list {unknown}"


def _subcommand_names(parser: argparse.ArgumentParser) -> set[str]:
    names: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            names.update(action.choices)
    return names


def _subcommand_of(parser: argparse.ArgumentParser, args: list[str]) -> str | None:
    """The first positional token after `shardsave`, skipping global options."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-"):
            return arg
        action = parser._option_string_actions.get(arg)
        takes_value = action is not None and action.nargs != 0 and "=" not in arg
        i += 2 if takes_value else 1
    return None


def test_shardsave_subcommands_exist() -> None:
    calls = _shardsave_calls()
    assert calls, "no `shardsave <subcommand>` call found in deploy/"
    cli = pytest.importorskip("shardsave.cli")
    parser = cli.build_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    names = _subcommand_names(parser)
    assert names, "shardsave.cli.build_parser() defines no subcommands"
    bad = sorted(
        f"{src}: shardsave {' '.join(args)}"
        for src, args in calls
        if _subcommand_of(parser, args) not in names
    )
    assert not bad, f"unknown shardsave subcommands (known: {sorted(names)}): {bad}"


# --------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------


def test_readme_documents_every_file() -> None:
    text = README.read_text()
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path != README:
            rel = path.relative_to(DEPLOY).as_posix()
            assert rel in text, f"deploy/README.md does not mention {rel}"
    assert "not executed" in text.lower() or "not run by ci" in text.lower()


def test_every_mpi_launch_uses_python_m_mpi4py() -> None:
    """Without ``-m mpi4py`` an error on one rank leaves the others waiting (README)."""
    launched = [run for run in _example_runs() if run.launcher is not None]
    assert len(launched) >= 5
    bad = [
        f"{run.source}: {' '.join(run.prefix)} {run.script}"
        for run in launched
        if run.prefix[-3:] not in (["python", "-m", "mpi4py"], ["python3", "-m", "mpi4py"])
    ]
    assert not bad, f"MPI launches without python -m mpi4py: {bad}"
