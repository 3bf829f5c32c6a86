"""Craft indexes as an attacker would: edit any field, then make every checksum right again.

``Crafted.load(prefix)`` parses ``P.index`` into its ``(key, entry)`` list (the header
stays raw bytes); a test edits entries with ``set`` (any ``BundleEntry`` field: dtype,
shape, shard_id, offset, size, crc32c, slices, block_size, block_crcs), optionally makes
an entry's checksums match the bytes really in the data file (``fix_crcs``), and
``save`` re-encodes a valid table with shardsave's own encoders, so every table block
checksum is right. Values no honest writer produces (negative dims, offsets >= 2**63)
are encoded as the varints a crafted file would hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shardsave.format import crc, table
from shardsave.format.coding import encode_varint
from shardsave.format.entry import BundleEntry
from shardsave.format.index import BundleHeader, entry_key

DATA = ".data-{:05d}-of-{:05d}"


@dataclass
class Crafted:
    prefix: str
    header: bytes
    entries: list[tuple[bytes, BundleEntry]]

    @classmethod
    def load(cls, prefix: str) -> Crafted:
        items = table.read_table(Path(prefix + ".index").read_bytes())
        assert items[0][0] == b""
        entries = []
        for key, value in items[1:]:
            e = BundleEntry.decode(value)
            entries.append((key, e._replace(slices=tuple(tuple(s) for s in e.slices))))
        return cls(prefix, items[0][1], entries)

    @property
    def num_shards(self) -> int:
        return BundleHeader.decode(self.header).num_shards

    def keys(self) -> list[bytes]:
        return [key for key, _ in self.entries]

    def get(self, key: bytes | str) -> BundleEntry:
        key = _key(key)
        return next(e for k, e in self.entries if k == key)

    def set(self, key: bytes | str, **fields) -> Crafted:
        """Replace fields of the entry under ``key`` (a name, or a raw key such as a slice key)."""
        key = _key(key)
        self.entries = [(k, e._replace(**fields) if k == key else e) for k, e in self.entries]
        return self

    def rename(self, key: bytes | str, new_key: bytes | str) -> Crafted:
        """Move an entry to another key (a slice key with other extents, a raw name)."""
        key, new_key = _key(key), _key(new_key)
        self.entries = [(new_key if k == key else k, e) for k, e in self.entries]
        return self

    def piece_keys(self, name: str) -> list[bytes]:
        """The slice keys of tensor ``name``'s pieces."""
        return [entry_key(name, ext) for ext in self.get(name).slices]

    def data_file(self, shard_id: int) -> Path:
        return Path(self.prefix + DATA.format(shard_id, self.num_shards))

    def stored_bytes(self, key: bytes | str, size: int | None = None) -> bytes:
        """The bytes the entry points at (or ``size`` bytes from its offset)."""
        e = self.get(key)
        with open(self.data_file(e.shard_id), "rb") as f:
            f.seek(e.offset)
            return f.read(e.size if size is None else size)

    def fix_crcs(self, key: bytes | str) -> Crafted:
        """Make the entry's checksum (and block checksums, if it has them) those of the
        bytes really in its data file, as a careful attacker would."""
        e = self.get(key)
        data = self.stored_bytes(key)
        fields = {"crc32c": crc.masked_crc32c(data)}
        if e.block_size:
            bs = e.block_size
            fields["block_crcs"] = b"".join(
                crc.masked_crc32c(data[i : i + bs]).to_bytes(4, "little") for i in range(0, len(data), bs)
            )
        return self.set(key, **fields)

    def encoded(self) -> bytes:
        items = sorted((k, encode_entry(e)) for k, e in self.entries)
        return table.build_table([(b"", self.header), *items])

    def save(self) -> str:
        Path(self.prefix + ".index").write_bytes(self.encoded())
        return self.prefix


def _key(key: bytes | str) -> bytes:
    return key.encode("utf-8") if isinstance(key, str) else key


def encode_entry(e: BundleEntry) -> bytes:
    """``BundleEntry.encode``, also for values no writer produces: negative ones as 64-bit
    two's complement, 2**63 and more as the long varints a crafted file may hold."""
    if all(0 <= v < 1 << 63 for v in (e.shard_id, e.offset, e.size, e.block_size)):
        return e.encode()
    out = [b"\x08", encode_varint(e.dtype)] if e.dtype else []
    out.append(BundleEntry(0, e.shape).encode())
    for tag, value in ((b"\x18", e.shard_id), (b"\x20", e.offset), (b"\x28", e.size)):
        if value:
            out += (tag, encode_varint(value))
    if e.crc32c:
        out += (b"\x35", e.crc32c.to_bytes(4, "little"))
    out += [BundleEntry(0, (), slices=(s,)).encode()[2:] for s in e.slices]
    if e.block_size:
        tail = BundleEntry(0, (), block_size=1, block_crcs=e.block_crcs).encode()[2:]
        size_tag = tail[:2]  # field 1000's tag, then varint 1, then field 1001
        out += (size_tag, encode_varint(e.block_size), tail[3:])
    return b"".join(out)


# ------------------------------------------------------------------ every reading path


def every_path(prefix: str, layouts: dict[str, dict]) -> dict[str, str]:
    """Run every code path that reads ``prefix`` and return, per path, ``"ok"`` or the
    name of the exception class it raised (``"ShardsaveError:<class>"`` for shardsave's).

    ``layouts``: name -> the ``Saver`` var_list to restore with (variables are rebuilt for
    each run from ``(name, array, global_shape, offset)`` tuples, see ``variables``).
    """
    import contextlib
    import io

    import shardsave as ss
    from shardsave import _inspect, cli
    from shardsave.reader import CheckpointReader, list_variables

    out: dict[str, str] = {}

    def run(path: str, fn) -> None:
        try:
            fn()
        except ss.ShardsaveError as exc:
            out[path] = f"ShardsaveError:{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - what the tests look for
            out[path] = f"{type(exc).__name__}: {exc}"
        else:
            out[path] = "ok"

    def reader_all() -> None:
        r = CheckpointReader(prefix)
        r.get_variable_to_shape_map()
        r.get_variable_to_dtype_map()
        r.debug_string()

    def tensors() -> None:
        r = CheckpointReader(prefix)
        for name in sorted(r.get_variable_to_shape_map()):
            r.get_tensor(name)

    def inspect() -> None:
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = cli.main(["inspect", prefix, "--values"])
        if code != 0:  # an error it caught (anything else escapes): one line, no traceback
            raise ss.ShardsaveError(err.getvalue().strip())

    def inspect_checkpoint() -> None:  # python -m shardsave.inspect_checkpoint, TF's tool
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = _inspect.main(["--file_name", prefix, "--all_tensors"])
        if code != 0:
            raise ss.ShardsaveError(err.getvalue().strip())

    def verify() -> None:  # shardsave verify: damage or an error, one line each, no traceback
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = cli.main(["verify", prefix])
        if code != 0:
            if "internal error" in err.getvalue():
                raise RuntimeError(err.getvalue().strip())
            raise ss.ShardsaveError(err.getvalue().strip())

    run("list_variables", lambda: list_variables(prefix))
    run("reader", reader_all)
    run("get_tensor", tensors)
    run("inspect", inspect)
    run("inspect_checkpoint", inspect_checkpoint)
    run("verify", verify)
    for name, spec in layouts.items():
        for in_place in (True, False, "direct"):
            run(
                f"restore:{name}:{ {True: 'in_place', False: 'new'}.get(in_place, in_place) }",
                lambda spec=spec, in_place=in_place: ss.Saver(
                    variables(spec), restore_in_place=in_place
                ).restore(prefix),
            )
    return out


def variables(spec: dict) -> dict:
    """A Saver var_list from ``{name: [(array, global_shape, offset), ...]}``, arrays copied."""
    import shardsave as ss

    return {
        name: [ss.Variable(name, a.copy(), global_shape=g, offset=o, register=False) for a, g, o in blocks]
        for name, blocks in spec.items()
    }


# ------------------------------------------------------------------ a checkpoint to craft from

EMB_SHAPE = (512, 1024)
"""A float32 tensor of 2 MiB, saved as two row pieces of 1 MiB with checksum blocks, so that
restores onto other layouts read it in place (rows: straight in, columns: slabs of rows)."""


def emb_value():
    import numpy as np

    return np.arange(EMB_SHAPE[0] * EMB_SHAPE[1], dtype=np.float32).reshape(EMB_SHAPE)


def standard_values() -> dict:
    import numpy as np

    return {
        "emb": emb_value(),
        "s": np.array([b"hi", b"", b"tensor"], dtype=object),
        "small": np.arange(10, dtype=np.float32),
        "small2": np.arange(6, dtype=np.int64).reshape(2, 3),
    }


def save_standard(directory: str) -> str:
    """Save the standard checkpoint (``emb`` in two row pieces, a string tensor, two small
    tensors) under ``directory/m``; returns its prefix."""
    import shardsave as ss

    values = standard_values()
    spec = {name: [(v, v.shape, (0,) * v.ndim)] for name, v in values.items() if name != "emb"}
    spec["emb"] = _emb_blocks([0, 256, 512], [0, 1024], values["emb"])
    return ss.Saver(variables(spec)).save(f"{directory}/m")


def standard_layouts() -> dict[str, dict]:
    """Variables (zero-filled) to restore the standard checkpoint into: the layout it was saved
    with, and two others (``emb`` cut by rows and by columns, blocks of 1.5 MiB in place)."""
    import numpy as np

    values = standard_values()
    base = {
        name: [
            (
                np.zeros_like(v) if v.dtype != object else np.array([b""] * v.size, object).reshape(v.shape),
                v.shape,
                (0,) * v.ndim,
            )
        ]
        for name, v in values.items()
        if name != "emb"
    }
    return {
        "same": {**base, "emb": _emb_blocks([0, 256, 512], [0, 1024])},
        "rows": {**base, "emb": _emb_blocks([0, 384, 512], [0, 1024])},
        "cols": {**base, "emb": _emb_blocks([0, 512], [0, 768, 1024])},
    }


def _emb_blocks(rows: list[int], cols: list[int], value=None) -> list:
    import numpy as np

    return [
        (
            np.zeros((r1 - r0, c1 - c0), np.float32) if value is None else value[r0:r1, c0:c1],
            EMB_SHAPE,
            (r0, c0),
        )
        for r0, r1 in zip(rows, rows[1:], strict=False)
        for c0, c1 in zip(cols, cols[1:], strict=False)
    ]


def every_path_isolated(prefix: str, address_space: int = 3 << 30, timeout: float = 120) -> dict:
    """``every_path(prefix, standard_layouts())`` in a subprocess limited to ``address_space``
    bytes, with its peak of traced allocations under ``"peak_bytes"``: a crash (SIGSEGV) or
    a hang fails the calling test instead of killing pytest."""
    import json
    import os
    import resource
    import subprocess
    import sys

    code = (
        "import json, sys, tracemalloc; sys.path.insert(0, sys.argv[2]); import crafting; "
        "tracemalloc.start(); out = crafting.every_path(sys.argv[1], crafting.standard_layouts()); "
        "out['peak_bytes'] = tracemalloc.get_traced_memory()[1]; print(json.dumps(out))"
    )

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    proc = subprocess.run(
        [sys.executable, "-c", code, prefix, os.path.dirname(__file__)],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit,
        env=os.environ.copy(),
    )
    assert proc.returncode == 0, f"the readers died (exit status {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
