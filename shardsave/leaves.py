"""Framework arrays as numpy arrays, without copies and without importing the frameworks.

A PyTorch CPU tensor or a JAX array is recognized by the module of its type (``torch``,
``jax``/``jaxlib``), so shardsave imports neither and works without them. A torch tensor
gives a numpy view of its own memory (bfloat16 and float8 through a same-size integer
view and ml_dtypes); a JAX array gives ``np.asarray``'s read-only view (JAX arrays are
immutable: a restore makes new ones, :func:`to_jax`).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .errors import InvalidArgumentError

# torch dtypes numpy lacks -> (same-size torch integer dtype name, ml_dtypes type)
_TORCH_VIA_INT = {
    "torch.bfloat16": ("int16", "bfloat16"),
    "torch.float8_e4m3fn": ("uint8", "float8_e4m3fn"),
    "torch.float8_e5m2": ("uint8", "float8_e5m2"),
}


def _root(value: Any) -> str:
    return type(value).__module__.partition(".")[0]


def is_torch(value: Any) -> bool:
    return _root(value) == "torch" and hasattr(value, "detach") and hasattr(value, "is_contiguous")


def is_jax(value: Any) -> bool:
    return _root(value) in ("jax", "jaxlib") and hasattr(value, "__array__") and hasattr(value, "dtype")


def torch_view(tensor: Any, what: str) -> np.ndarray:
    """A numpy array over the tensor's own memory (strided like the tensor).

    Raises InvalidArgumentError (naming ``what``) for a tensor that has no such view: not
    on the CPU, not strided (sparse), quantized, or of a dtype numpy cannot hold."""
    t = tensor.detach()
    if t.device.type != "cpu":
        raise InvalidArgumentError(
            f"{what}: a torch tensor on {t.device} cannot be saved in place; move it to the CPU "
            "(sharded and device arrays are saved by giving each rank's CPU block as a Variable)"
        )
    if str(t.layout) != "torch.strided" or t.is_quantized:
        raise InvalidArgumentError(f"{what}: a {t.layout} torch tensor has no numpy view; convert it first")
    if t.is_conj() or t.is_neg():  # a lazy view: its values are not in its memory
        raise InvalidArgumentError(f"{what}: a lazily conjugated or negated torch tensor: resolve_conj() it")
    via = _TORCH_VIA_INT.get(str(t.dtype))
    try:
        if via is not None:
            import ml_dtypes  # here, not at startup: it takes about a second to import

            torch = sys.modules[type(tensor).__module__.partition(".")[0]]
            return t.view(getattr(torch, via[0])).numpy().view(getattr(ml_dtypes, via[1]))
        return t.numpy()
    except (TypeError, RuntimeError) as exc:
        raise InvalidArgumentError(f"{what}: torch tensor of dtype {t.dtype}: {exc}") from None


def jax_view(array: Any, what: str) -> np.ndarray:
    """``np.asarray`` of a JAX array (read-only, a copy only where the device needs one)."""
    if not getattr(array, "is_fully_addressable", True):
        raise InvalidArgumentError(
            f"{what}: a JAX array sharded over processes is out of scope; give each rank's block "
            "as a Variable with global_shape and offset"
        )
    try:
        return np.asarray(array)
    except (TypeError, ValueError) as exc:  # typed PRNG keys: jax.random.key_data(key)
        raise InvalidArgumentError(
            f"{what}: JAX array of dtype {array.dtype} has no numpy value ({exc}); "
            "for a PRNG key save jax.random.key_data(key)"
        ) from None


def numpy_view(value: Any, what: str) -> np.ndarray | None:
    """A numpy array over ``value``'s own memory, or None if it has none (a list, a Python
    number): a numpy array itself, a torch tensor's view, a JAX array's ``np.asarray``."""
    if isinstance(value, np.ma.MaskedArray):  # its mask would be lost (and a tree saved its fill values)
        raise InvalidArgumentError(
            f"{what} is a numpy masked array: a checkpoint stores no mask; pass .filled(...) or .data "
            "(and the mask, .mask, as a leaf of its own)"
        )
    if isinstance(value, np.ndarray):
        return value
    if is_torch(value):
        return torch_view(value, what)
    if is_jax(value):
        return jax_view(value, what)
    return None


def shareable(arr: np.ndarray, dtype: Any = None, strided: bool = False) -> bool:
    """Whether a Variable can hold ``arr`` itself: writable, C-contiguous (any strides
    with ``strided``), not an object array, and ``dtype`` (if given) its own dtype.
    np.matrix, whose shapes follow other rules, is copied (masked arrays are refused)."""
    return (
        (type(arr) is np.ndarray or isinstance(arr, np.memmap))
        and arr.flags.writeable
        and (strided or arr.flags.c_contiguous)
        and not arr.dtype.hasobject
        and (dtype is None or np.dtype(dtype) == arr.dtype)
    )


def to_jax(like: Any, arr: np.ndarray) -> Any:
    """A new JAX array holding ``arr``, on the device(s) of ``like`` (a JAX array)."""
    jax = sys.modules["jax"]
    sharding = getattr(like, "sharding", None)
    return jax.device_put(arr, sharding) if sharding is not None else jax.device_put(arr)
