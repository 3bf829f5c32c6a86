"""The fuzz worker: runs cases through every read and restore path of shardsave.

Run as a script (``python tests/fuzz/worker.py``) so that ``shardsave`` comes from the
worker's PYTHONPATH, which may name another copy than the harness's. It imports nothing of
the harness: a case arrives as the path of a pickle of plain data (the checkpoint prefix,
the restore layouts and the reference values of oracle.py), one per line on stdin. Before
each operation the worker prints ``@<operation>``; at the end ``=<json result>``. A crash
or a hang shows as the worker's death (faulthandler writes the Python stack to stderr).
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import os
import pickle
import resource
import sys
import traceback

import ml_dtypes
import numpy as np

import shardsave as ss
from shardsave._comm import Comm
from shardsave.errors import ShardsaveError


class Mismatch(Exception):
    """A read succeeded with values the checkpoint does not define."""

    def __init__(self, kind: str, msg: str):
        super().__init__(msg)
        self.kind = kind


def numpy_dtype(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)


def where(tb) -> str:
    """The innermost frame of the traceback inside shardsave (else the innermost)."""
    frames = traceback.extract_tb(tb)
    inside = [f for f in frames if f"{os.sep}shardsave{os.sep}" in f.filename]
    f = (inside or frames or [None])[-1]
    if f is None:
        return "?"
    path = f.filename
    cut = path.rfind(f"{os.sep}shardsave{os.sep}")
    return f"{path[cut + 1 :] if cut >= 0 else os.path.basename(path)}:{f.lineno} in {f.name}"


def same(got, want) -> bool:
    got = np.asarray(got)
    if got.shape != want.shape:
        return False
    if want.dtype.hasobject or got.dtype.hasobject:
        return [bytes(x) if isinstance(x, bytes | np.bytes_) else x for x in got.reshape(-1)] == list(
            want.reshape(-1)
        )
    return got.dtype == want.dtype and got.tobytes() == want.tobytes()


def expect(ref, name: str, got, region=None, shape=None, partial: bool = False) -> None:
    """``got`` (a successful read of ``name``, or of ``region`` of it) must match the reference.

    A ``partial`` read (get_slice) needs only the pieces and checksum blocks it covers, so
    damage elsewhere in the tensor is no reason to fail: it is compared only when the
    whole tensor is well defined."""
    if ref is None:
        return  # the table itself does not parse for the oracle: nothing to compare with
    found = ref.get(name)
    if found is None:
        raise Mismatch("accepted-bad", f"{name!r}: read succeeded, the index holds no such tensor")
    status, value = found
    if status == "bad" and partial:
        return
    if status == "bad":
        raise Mismatch("accepted-bad", f"{name!r}: read succeeded although {value}")
    if region is not None:
        value = value[region]
    if shape is not None:
        value = value.reshape(shape)
    if not same(got, value):
        raise Mismatch(
            "wrong-value",
            f"{name!r}: values differ from the bytes in the data file "
            f"(got {np.asarray(got).dtype}{list(np.shape(got))}, expected {value.dtype}{list(value.shape)})",
        )


RSS_BOUND = int(os.environ.get("FUZZ_RSS_BOUND", 512 << 20))


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_op(results: list, op: str, fn) -> bool:
    """Run one operation and record its outcome; True if it succeeded."""
    print("@" + op, flush=True)
    before = maxrss()
    try:
        fn()
        results.append({"op": op, "status": "ok"})
        return True
    except Mismatch as exc:
        results.append(
            {
                "op": op,
                "status": "finding",
                "kind": exc.kind,
                "type": "Mismatch",
                "msg": str(exc),
                "where": op.split(":")[0],
            }
        )
    except ShardsaveError as exc:
        results.append({"op": op, "status": "error", "type": type(exc).__name__, "msg": str(exc)[:200]})
    except Exception as exc:  # noqa: BLE001  (anything else is what the fuzzer looks for)
        results.append(
            {
                "op": op,
                "status": "finding",
                "kind": "exception",
                "type": type(exc).__name__,
                "msg": str(exc)[:300],
                "where": where(exc.__traceback__),
                "tb": "".join(traceback.format_exception(exc))[-3000:],
            }
        )
    finally:
        grown = maxrss() - before
        if grown > RSS_BOUND:  # the peak RSS of this process rose by more than the bound
            results.append(
                {
                    "op": op,
                    "status": "finding",
                    "kind": "memory",
                    "type": "RSS",
                    "where": op.split(":")[0],
                    "msg": f"peak RSS grew by {grown >> 20} MiB",
                }
            )
    return False


def initial(dtype: np.dtype, shape) -> np.ndarray:
    if dtype.hasobject:
        return np.full(shape, b"init", object)
    return np.full(shape, 7, dtype)


def restore_layout(results: list, prefix: str, ref, layout: dict) -> None:
    var_list, blocks = {}, []
    for d in layout["decls"]:
        dt = numpy_dtype(d["dtype"])
        parts = []
        for offset, shape in d["blocks"]:
            declared = tuple(d["shape"]) if d["shape"] is not None else tuple(shape)
            if d["shape"] is not None:
                v = ss.Variable(d["name"], initial(dt, declared), register=False)
            else:
                v = ss.Variable(
                    d["name"],
                    initial(dt, shape),
                    global_shape=d["global_shape"],
                    offset=offset,
                    register=False,
                )
            region = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
            parts.append(v)
            blocks.append((d["name"], v, v.value, v.value.copy(), region, d["shape"]))
        var_list[d["name"]] = parts if len(parts) > 1 else parts[0]
    saver = ss.Saver(
        var_list,
        comm=Comm(None),
        restore_in_place=layout["in_place"],
        reshape=layout["reshape"],
        max_to_keep=None,
    )

    raised = {}

    def restore():
        try:
            saver.restore(prefix)
        except Exception as exc:
            raised["error"] = exc
            raise
        for name, v, _, _, region, shape in blocks:
            if shape is not None:
                expect(ref, name, v.value, shape=tuple(shape))
            else:
                expect(ref, name, v.value, region=region)

    if not run_op(results, f"restore:{layout['mode']}", restore) and results[-1]["status"] == "error":
        changed = [
            name for name, v, own, before, _, _ in blocks if v.value is not own or not same(own, before)
        ]
        if layout["in_place"] == "direct":  # may write: but only what its error says it did
            error = raised["error"]
            said = set(getattr(error, "partly", ())) | set(getattr(error, "restored", ()))
            changed = [name for name in changed if name not in said]
        if changed:  # a failed restore must leave every variable as it was
            results.append(
                {
                    "op": f"restore:{layout['mode']}",
                    "status": "finding",
                    "kind": "partial-write",
                    "type": "Mismatch",
                    "where": "restore",
                    "msg": f"restore raised {results[-1]['type']} but changed {changed}",
                }
            )


def read_all(results: list, prefix: str, ref) -> None:
    run_op(results, "list_variables", lambda: ss.list_variables(prefix))

    def inspect():  # the inspection tool prints every tensor: keep it off the protocol's stdout
        with contextlib.redirect_stdout(io.StringIO()):
            ss.print_tensors_in_checkpoint_file(prefix, "", all_tensors=True, all_tensor_names=True)

    run_op(results, "print_tensors", inspect)
    box = {}

    def open_reader():
        box["r"] = ss.CheckpointReader(prefix)

    if not run_op(results, "reader", open_reader):
        return
    r = box["r"]

    def shape_map():
        box["shapes"] = r.get_variable_to_shape_map()

    def others():
        _ = r.num_shards, r.get_entries()
        for name in box.get("shapes", ()):
            r.has_tensor(name)

    run_op(results, "get_variable_to_shape_map", shape_map)
    run_op(results, "get_variable_to_dtype_map", r.get_variable_to_dtype_map)
    run_op(results, "debug_string", r.debug_string)
    run_op(results, "has_tensor", others)
    if "shapes" not in box:
        return
    for name, shape in box["shapes"].items():
        run_op(results, f"get_tensor:{name!r}", lambda n=name: expect(ref, n, r.get_tensor(n)))
        if shape and 2 <= shape[0] <= 1 << 40:
            half = shape[0] // 2
            run_op(
                results,
                f"get_slice:{name!r}",
                lambda n=name, h=half: expect(
                    ref, n, r.get_slice(n, slice(0, h)), region=(slice(0, h),), partial=True
                ),
            )


def run_case(spec: dict) -> dict:
    results: list = []
    read_all(results, spec["prefix"], spec["ref"])
    for layout in spec["layouts"]:
        try:
            restore_layout(results, spec["prefix"], spec["ref"], layout)
        except ShardsaveError as exc:  # declaring the variables is not what is tested
            results.append(
                {
                    "op": f"restore:{layout['mode']}",
                    "status": "error",
                    "type": type(exc).__name__,
                    "msg": f"while declaring: {exc}"[:200],
                }
            )
    return {"ops": results, "maxrss": maxrss()}


def main() -> None:
    limit = int(os.environ.get("FUZZ_AS_LIMIT", 3 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    timeout = float(os.environ.get("FUZZ_CASE_TIMEOUT", 20))
    faulthandler.enable(file=sys.stderr, all_threads=True)
    print(
        "=" + json.dumps({"ready": True, "shardsave": os.path.dirname(ss.__file__), "maxrss": maxrss()}),
        flush=True,
    )
    for line in sys.stdin:
        with open(line.strip(), "rb") as f:
            spec = pickle.load(f)
        faulthandler.dump_traceback_later(timeout, exit=True)
        result = run_case(spec)
        faulthandler.cancel_dump_traceback_later()
        print("=" + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
