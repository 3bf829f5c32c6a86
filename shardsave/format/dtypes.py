"""TensorFlow DataType numbers and their numpy equivalents (types.proto)."""

from __future__ import annotations

import numpy as np

DT_STRING = 7

# TF enum -> (TF name, numpy dtype or None for strings)
_TF_TYPES: dict[int, tuple[str, np.dtype | None]] = {
    1: ("float32", np.dtype(np.float32)),
    2: ("float64", np.dtype(np.float64)),
    3: ("int32", np.dtype(np.int32)),
    4: ("uint8", np.dtype(np.uint8)),
    5: ("int16", np.dtype(np.int16)),
    6: ("int8", np.dtype(np.int8)),
    7: ("string", None),
    8: ("complex64", np.dtype(np.complex64)),
    9: ("int64", np.dtype(np.int64)),
    10: ("bool", np.dtype(np.bool_)),
    17: ("uint16", np.dtype(np.uint16)),
    18: ("complex128", np.dtype(np.complex128)),
    19: ("float16", np.dtype(np.float16)),
    22: ("uint32", np.dtype(np.uint32)),
    23: ("uint64", np.dtype(np.uint64)),
}
_ML_TYPES = {14: "bfloat16", 24: "float8_e5m2", 25: "float8_e4m3fn"}
"""ml_dtypes' types, added to the tables the first time one is needed: importing
ml_dtypes costs about a second (0.7.0; 0.1 s for 0.5), which every rank of every job
would pay at startup; an array of one of these types means it is imported already."""
KNOWN = frozenset(_TF_TYPES) | frozenset(_ML_TYPES)
"""The DataType numbers ``to_numpy`` knows."""
_FROM_NUMPY = {dt: num for num, (_, dt) in _TF_TYPES.items() if dt is not None}

_BY_ID: dict[int, tuple[object, int]] = {}


def _load_ml_dtypes() -> None:
    if 14 in _TF_TYPES:
        return
    import ml_dtypes

    for num, name in _ML_TYPES.items():
        dt = np.dtype(getattr(ml_dtypes, name))
        _TF_TYPES[num] = (name, dt)
        _FROM_NUMPY[dt] = num


STRING_DTYPE = np.dtype(object)
"""Strings live in numpy arrays of ``bytes`` objects (dtype=object)."""


def is_string(dtype: np.dtype) -> bool:
    return dtype.kind in "OSU"


def to_tf(dtype: np.dtype) -> int:
    """TF DataType number of a numpy dtype; ValueError if the format cannot hold it."""
    hit = _BY_ID.get(id(dtype))  # dtype hashing is slow; this is called per tensor
    if hit is not None and hit[0] is dtype:
        return hit[1]
    original = dtype
    dtype = np.dtype(dtype)
    found = _FROM_NUMPY.get(dtype)
    if found is not None:
        if len(_BY_ID) < 256:
            _BY_ID[id(original)] = (original, found)
        return found
    if is_string(dtype):
        return DT_STRING
    if dtype.type.__module__.partition(".")[0] == "ml_dtypes" and 14 not in _TF_TYPES:
        _load_ml_dtypes()
        return to_tf(original)
    try:
        return _FROM_NUMPY[dtype.newbyteorder("=") if dtype.byteorder == "<" else dtype]
    except KeyError:
        supported = ", ".join(sorted({name for name, _ in _TF_TYPES.values()} | set(_ML_TYPES.values())))
        raise ValueError(
            f"dtype {dtype} cannot be stored in a TensorFlow checkpoint (supported: {supported})"
        ) from None


def to_numpy(tf_type: int) -> np.dtype:
    """numpy dtype of a TF DataType number (object for strings); ValueError if unknown."""
    if tf_type in _ML_TYPES:
        _load_ml_dtypes()
    try:
        dt = _TF_TYPES[tf_type][1]
    except KeyError:
        raise ValueError(f"unsupported TensorFlow DataType {tf_type}") from None
    return STRING_DTYPE if dt is None else dt


def tf_name(tf_type: int) -> str:
    if tf_type in _ML_TYPES:
        return _ML_TYPES[tf_type]
    return _TF_TYPES[tf_type][0] if tf_type in _TF_TYPES else f"DataType({tf_type})"


def tf_enum_name(tf_type: int) -> str:
    """TF's spelling in debug strings: DT_FLOAT, DT_INT32, ..."""
    special = {1: "DT_FLOAT", 2: "DT_DOUBLE", 19: "DT_HALF"}
    return special.get(tf_type) or "DT_" + tf_name(tf_type).upper()
