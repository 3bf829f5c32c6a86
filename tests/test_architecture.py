"""The layout holds: public names pinned, no import cycles, small modules, pure layers.

These read the package's source with ``ast`` (imports at any depth, except under
``if TYPE_CHECKING:``), so a cycle or a stray fsspec import fails here, not in review.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import shardsave

PACKAGE = pathlib.Path(shardsave.__file__).parent
MAX_MODULE_LINES = 450

PUBLIC = [
    "AbortedError", "CheckpointManager", "CheckpointReader", "CheckpointState", "DataLossError", "DeadlineExceededError",
    "FailedPreconditionError", "Graph", "InvalidArgumentError", "NewCheckpointReader", "NotFoundError",
    "PartitionedVariable", "PerRank", "PermissionDeniedError", "ResourceExhaustedError", "SaveHandle", "Saver",
    "ShardsaveError", "StorageError", "TreeState", "UnauthenticatedError", "UnavailableError", "Variable",
    "checkpoint_exists", "constant_initializer", "errors", "fixed_size_partitioner", "get_checkpoint_state",
    "get_default_graph", "get_variable", "global_variables", "latest_checkpoint", "list_variables",
    "load_variable", "min_max_variable_partitioner", "ones_initializer", "print_tensors_in_checkpoint_file",
    "random_normal_initializer", "random_uniform_initializer", "read_metadata", "reset_default_graph", "trainable_variables",
    "update_checkpoint_state", "variable_axis_size_partitioner", "zeros_initializer",
]  # fmt: skip


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str) -> set[str]:
    """Every module ``module`` imports (absolute names), outside ``if TYPE_CHECKING:``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # "from . import storage"
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def _internal_graph() -> dict[str, set[str]]:
    return {m: {i for i in _imports(m) if i in MODULES and i != m} for m in MODULES}


def test_public_names_are_pinned():
    assert sorted(shardsave.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(shardsave, name) is not None, name


def test_no_import_cycles_inside_the_package():
    graph = _internal_graph()
    # a package imports its submodules' names through __init__; an edge to one's own
    # package is how Python resolves relative imports, not a dependency
    for m, deps in graph.items():
        deps -= {p for p in deps if m.startswith(p + ".")}
    done: set[str] = set()
    stack: list[str] = []

    def walk(m: str) -> None:
        if m in stack:
            cycle = stack[stack.index(m) :] + [m]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if m in done:
            return
        stack.append(m)
        for dep in sorted(graph[m]):
            walk(dep)
        stack.pop()
        done.add(m)

    for m in sorted(graph):
        walk(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_are_small(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{MODULES[module]} has {lines} lines (at most {MAX_MODULE_LINES})"


def _outside(module: str, allowed: tuple[str, ...]) -> list[str]:
    return sorted(i for i in _imports(module) if i.split(".")[0] not in allowed)


STDLIB_OK = ("__future__", "bisect", "collections", "dataclasses", "operator", "re", "struct", "typing",
             "functools", "itertools", "math")  # fmt: skip


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("shardsave.format")))
def test_format_is_pure(module):
    """format/ parses and encodes bytes: no I/O, no MPI, nothing from the rest of the package."""
    outside = _outside(module, STDLIB_OK + ("numpy", "ml_dtypes", "crc32c"))
    outside = [i for i in outside if not i.startswith("shardsave.format")]
    assert outside == [], f"{module} imports {outside}"


def test_plan_is_pure():
    """plan.py decides who writes what from metadata alone: no I/O, no MPI."""
    outside = _outside("shardsave.plan", STDLIB_OK + ("numpy",))
    allowed = ("shardsave.errors", "shardsave.format")
    assert [i for i in outside if not i.startswith(allowed)] == []


@pytest.mark.parametrize(
    "library, home",
    [
        ("fsspec", "shardsave.storage"),
        ("s3fs", "shardsave.storage"),
        ("mpi4py", "shardsave._comm"),
        ("signal", "shardsave.manager.preemption"),  # handlers installed and removed in one place
    ],
)
def test_one_room_imports_each_library(library, home):
    users = sorted(m for m in MODULES if any(i.split(".")[0] == library for i in _imports(m)))
    assert all(m == home or m.startswith(home + ".") for m in users), f"{library} imported by {users}"


@pytest.mark.parametrize("library", ["torch", "jax", "jaxlib", "tensorflow"])
def test_no_framework_is_imported(library):
    """leaves.py recognizes torch and JAX arrays by the module of their type: shardsave
    works without them and never pays for importing them."""
    users = sorted(m for m in MODULES if any(i.split(".")[0] == library for i in _imports(m)))
    assert users == [], f"{library} imported by {users}"


def test_manager_policy_is_pure():
    """The manager's retention policy decides from what it is given: every rank computes
    the same outcome, so it must not read storage, the clock or talk to other ranks."""
    outside = _outside("shardsave.manager.policy", STDLIB_OK)
    assert [i for i in outside if not i.startswith("shardsave.errors")] == [], outside
