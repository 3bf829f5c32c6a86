"""The valid checkpoints every fuzz case starts from, written by shardsave itself.

Each seed is a set of variables saved with one layout, plus the layouts a restore declares
them with: ``fresh`` (the saved layout, new arrays), ``in_place`` (the saved layout, into
arrays the variables hold), ``other`` (another block split, so the restore reshards; the
large blocks are >= 1 MiB so they are written in place), ``small`` (only the small whole
tensors: the bulk path), ``direct`` (a reshard in one pass, ``restore_in_place="direct"``) and ``reshape`` (whole tensors declared with another shape of the
same size, ``reshape=True``). Layouts are plain data (``Decl``) so a worker can build the
variables with whatever copy of shardsave it imports.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import ml_dtypes
import numpy as np

MIB = 1 << 20


class Decl(NamedTuple):
    """One variable of a restore layout: its blocks ``(offset, shape)`` of ``global_shape``;
    ``shape`` differs from ``global_shape`` only for a reshape restore."""

    name: str
    dtype: str
    global_shape: tuple[int, ...]
    blocks: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
    shape: tuple[int, ...] | None = None


class Layout(NamedTuple):
    mode: str  # fresh, in_place, other, small, reshape
    decls: tuple[Decl, ...]
    in_place: bool | str  # True, False or "direct"
    reshape: bool = False


def numpy_dtype(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)


def _whole(name: str, dtype: str, shape: tuple[int, ...]) -> Decl:
    return Decl(name, dtype, shape, (((0,) * len(shape), shape),))


def _rows(name: str, dtype: str, shape: tuple[int, ...], parts: int) -> Decl:
    step = shape[0] // parts
    return Decl(name, dtype, shape, tuple(((i * step, 0), (step, shape[1])) for i in range(parts)))


def _cols(name: str, dtype: str, shape: tuple[int, ...], parts: int) -> Decl:
    step = shape[1] // parts
    return Decl(name, dtype, shape, tuple(((0, i * step), (shape[0], step)) for i in range(parts)))


def _values(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "object":
        pool = [b"", b"a", b"hello", b"\xff\x00\xfe", bytes(range(40)), b"x" * 200]
        flat = np.empty(int(np.prod(shape)), object)
        for i in range(flat.size):
            flat[i] = pool[int(rng.integers(len(pool)))]
        return flat.reshape(shape)
    dt = numpy_dtype(dtype)
    if dt == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    if dt.kind in "iu":
        return rng.integers(0, 100, shape).astype(dt)
    if dt.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dt)
    return rng.standard_normal(shape).astype(np.float32).astype(dt)


_SMALL_PLAIN = (
    ("f32", "float32", (4, 5)),
    ("f64", "float64", (3,)),
    ("i32", "int32", (2, 3)),
    ("bf16", "bfloat16", (8,)),
    ("flag", "bool", (5,)),
    ("i8", "int8", ()),
    ("c64", "complex64", (2,)),
    ("f16", "float16", (3, 2)),
    ("u64", "uint64", (2,)),
    ("e", "float32", (0, 3)),
)


def _seed_specs() -> dict[str, dict]:
    """name -> {"saved": decls as saved, "layouts": [Layout]}."""
    small = tuple(_whole(n, d, s) for n, d, s in _SMALL_PLAIN)
    big = (1024, 512)  # float32: 2 MiB, halves of 1 MiB (in place), block CRCs
    plain = {
        "saved": (*small, _whole("big", "float32", big)),
        "layouts": [
            Layout("fresh", (*small, _whole("big", "float32", big)), False),
            Layout("in_place", (*small, _whole("big", "float32", big)), True),
            Layout("other", (_cols("big", "float32", big, 2), *small[:2]), True),
            Layout("direct", (_rows("big", "float32", big, 2), *small[:2]), "direct"),
            Layout("small", small, True),
            Layout(
                "reshape",
                (
                    Decl("big", "float32", big, (((0, 0), big),), (512, 1024)),
                    Decl("f32", "float32", (4, 5), (((0, 0), (4, 5)),), (20,)),
                ),
                True,
                True,
            ),
        ],
    }
    emb, bf, w = (1024, 512), (1024, 512), (6, 4)
    sliced_saved = (
        _rows("emb", "float32", emb, 4),
        _rows("bf", "bfloat16", bf, 2),
        _cols("w", "int32", w, 2),
        _whole("s", "float32", (3,)),
    )
    sliced = {
        "saved": sliced_saved,
        "layouts": [
            Layout("fresh", sliced_saved, False),
            Layout("in_place", sliced_saved, True),
            Layout(
                "other",
                (
                    _cols("emb", "float32", emb, 2),
                    _whole("bf", "bfloat16", bf),
                    _rows("w", "int32", w, 3),
                    _whole("s", "float32", (3,)),
                ),
                True,
            ),
            Layout(
                "reshape",
                (
                    Decl("emb", "float32", emb, (((0, 0), emb),), (512, 1024)),
                    Decl("w", "int32", w, (((0, 0), w),), (24,)),
                ),
                True,
                True,
            ),
        ],
    }
    strings_saved = (
        _whole("s1", "object", (3,)),
        _whole("s2", "object", (2, 2)),
        Decl("ss", "object", (4,), (((0,), (2,)), ((2,), (2,)))),
        _whole("f", "float32", (2,)),
        _whole("long", "object", (2000,)),
    )
    strings = {
        "saved": strings_saved,
        "layouts": [
            Layout("fresh", strings_saved, False),
            Layout("in_place", strings_saved, True),
            Layout(
                "other",
                (
                    _whole("ss", "object", (4,)),
                    Decl("long", "object", (2000,), (((0,), (500,)), ((500,), (1500,)))),
                    _whole("s1", "object", (3,)),
                ),
                True,
            ),
            Layout("reshape", (Decl("s2", "object", (2, 2), (((0, 0), (2, 2)),), (4,)),), True, True),
        ],
    }
    d, h = (256, 1024), (600, 600)
    big_saved = (
        _whole("d", "float64", d),
        _whole("h", "float16", h),
        _whole("i", "int64", (70000,)),
        _whole("t", "int16", (7,)),
    )
    bigs = {
        "saved": big_saved,
        "layouts": [
            Layout("fresh", big_saved, False),
            Layout("in_place", big_saved, True),
            Layout("other", (_rows("d", "float64", d, 2), _rows("h", "float16", h, 3)), True),
            Layout("direct", (_cols("d", "float64", d, 2), _whole("i", "int64", (70000,))), "direct"),
            Layout(
                "reshape",
                (
                    Decl("d", "float64", d, (((0, 0), d),), (1024, 256)),
                    Decl("i", "int64", (70000,), (((0,), (70000,)),), (700, 100)),
                ),
                True,
                True,
            ),
        ],
    }
    return {"plain": plain, "sliced": sliced, "strings": strings, "big": bigs}


SPECS = _seed_specs()
SEED_NAMES = tuple(SPECS)
PREFIX = "ckpt"


def build_seeds(root: str) -> dict[str, str]:
    """Write every seed checkpoint under ``root``; ``{seed name: its directory}``."""
    import shardsave as ss
    from shardsave._comm import Comm

    out = {}
    for i, (seed, spec) in enumerate(SPECS.items()):
        rng = np.random.default_rng(i)
        directory = os.path.join(root, seed)
        os.makedirs(directory, exist_ok=True)
        var_list = {}
        for decl in spec["saved"]:
            full = _values(rng, decl.dtype, decl.global_shape)
            parts = []
            for offset, shape in decl.blocks:
                region = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
                parts.append(
                    ss.Variable(
                        decl.name,
                        np.array(full[region]),
                        global_shape=decl.global_shape,
                        offset=offset,
                        register=False,
                    )
                )
            var_list[decl.name] = parts if len(parts) > 1 else parts[0]
        ss.Saver(var_list, comm=Comm(None), max_to_keep=None).save(
            os.path.join(directory, PREFIX), write_state=False
        )
        out[seed] = directory
    return out
