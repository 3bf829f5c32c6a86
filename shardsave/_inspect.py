"""Print the tensors of a checkpoint, as TF's ``inspect_checkpoint`` does (see inspect_checkpoint.py).

python -m shardsave.inspect_checkpoint --file_name P [--tensor_name N] [--all_tensors]
    [--all_tensor_names] [--printoptions k=v ...]
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import numpy as np

from ._paths import checkpoint_prefix
from .errors import ShardsaveError
from .reader import CheckpointReader


def print_tensors_in_checkpoint_file(
    file_name: str,
    tensor_name: str,
    all_tensors: bool,
    all_tensor_names: bool = False,
    *,
    storage_options: dict | None = None,
    fs: Any = None,
) -> None:
    """Print one tensor, every tensor, or the names, dtypes and shapes of all tensors."""
    reader = CheckpointReader(file_name, storage_options=storage_options, fs=fs)
    if all_tensors or all_tensor_names:
        shapes = reader.get_variable_to_shape_map()
        dtypes = reader.get_variable_to_dtype_map()
        for name in sorted(shapes):
            print(f"tensor_name:  {name} ({_dtype_name(dtypes[name])}) {shapes[name]}")
            if all_tensors:
                print(reader.get_tensor(name))
        total = sum(math.prod(s) for s in shapes.values())
        print(f"# Total number of params: {total}")
    elif not tensor_name:
        print(reader.debug_string().decode("utf-8", errors="replace"), end="")
    else:
        value = reader.get_tensor(tensor_name)
        print(f"tensor_name:  {tensor_name} ({_dtype_name(value.dtype)}) {list(value.shape)}")
        print(value)
        print(f"# Total number of params: {value.size}")


def _dtype_name(dtype: np.dtype) -> str:
    return "string" if dtype.kind == "O" else str(dtype)


def parse_numpy_printoption(kv_str: str) -> None:
    """Set one numpy print option from ``k=v`` (TF's helper of the same name)."""
    key, sep, value = kv_str.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"setting {kv_str!r} must be in key=value form")
    current = np.get_printoptions()
    if key not in current:
        raise argparse.ArgumentTypeError(f"{key!r} is not a numpy print option")
    kind = type(current[key])
    if kind is bool:
        parsed: Any = value.lower() in ("1", "true", "yes")
    elif current[key] is None or kind in (int, float):
        parsed = (
            int(value)
            if value.isdigit()
            else (float(value) if value.replace(".", "", 1).isdigit() else value)
        )
        if key == "threshold" and value in ("inf", "sys.maxsize"):
            parsed = sys.maxsize
    else:
        parsed = value
    np.set_printoptions(**{key: parsed})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shardsave.inspect_checkpoint", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--file_name", required=True, help="checkpoint prefix, one of its files (P.index...), or directory"
    )
    parser.add_argument("--tensor_name", default="", help="the tensor to print")
    parser.add_argument("--all_tensors", action="store_true", help="print every tensor's values")
    parser.add_argument("--all_tensor_names", action="store_true", help="print every tensor's name")
    parser.add_argument(
        "--printoptions",
        nargs="*",
        type=parse_numpy_printoption,
        default=[],
        help="numpy print options as key=value, e.g. threshold=100000",
    )
    args = parser.parse_args(argv)
    try:
        prefix = checkpoint_prefix(args.file_name, None)
        print_tensors_in_checkpoint_file(prefix, args.tensor_name, args.all_tensors, args.all_tensor_names)
    except ShardsaveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
