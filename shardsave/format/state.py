"""The ``checkpoint`` state file: a CheckpointState message in protobuf text format.

model_checkpoint_path: "model.ckpt-3"
all_model_checkpoint_paths: "model.ckpt-2"
all_model_checkpoint_paths: "model.ckpt-3"
all_model_checkpoint_timestamps: 1732540000.5
last_preserved_timestamp: 1732539000.25
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .coding import DecodeError

MAX_STATE_BYTES = 4 << 20
"""A state file larger than this is not read: it is damaged or not a state file."""
MAX_STATE_ENTRIES = 10_000
"""At most this many checkpoint paths (and as many timestamps) in a state file."""


@dataclass
class CheckpointState:
    model_checkpoint_path: str = ""
    all_model_checkpoint_paths: list[str] = field(default_factory=list)
    all_model_checkpoint_timestamps: list[float] = field(default_factory=list)
    last_preserved_timestamp: float = 0.0


def _quote(text: str) -> str:
    out = []
    for byte in text.encode("utf-8"):
        ch = chr(byte)
        if ch in "\"'\\":
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif 0x20 <= byte < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


_ESCAPES = {
    "n": b"\n",
    "r": b"\r",
    "t": b"\t",
    '"': b'"',
    "'": b"'",
    "\\": b"\\",
    "a": b"\a",
    "b": b"\b",
    "f": b"\f",
    "v": b"\v",
    "?": b"?",
}


def _unquote(body: str) -> str:
    out = bytearray()
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out += ch.encode("utf-8")
            i += 1
            continue
        nxt = body[i + 1 : i + 2]
        if nxt in _ESCAPES:
            out += _ESCAPES[nxt]
            i += 2
        elif nxt in ("x", "X"):
            m = re.match(r"[0-9a-fA-F]{1,2}", body[i + 2 :])
            if not m:
                raise DecodeError(f"bad \\x escape in {body!r}")
            out.append(int(m.group(), 16))
            i += 2 + len(m.group())
        else:
            m = re.match(r"[0-7]{1,3}", body[i + 1 :])
            if not m:
                raise DecodeError(f"bad escape in {body!r}")
            out.append(int(m.group(), 8))
            i += 1 + len(m.group())
    return out.decode("utf-8", errors="surrogateescape")


def encode_state(state: CheckpointState) -> bytes:
    lines = [f"model_checkpoint_path: {_quote(state.model_checkpoint_path)}"]
    lines += [f"all_model_checkpoint_paths: {_quote(p)}" for p in state.all_model_checkpoint_paths]
    lines += [f"all_model_checkpoint_timestamps: {t!r}" for t in state.all_model_checkpoint_timestamps]
    if state.last_preserved_timestamp:
        lines.append(f"last_preserved_timestamp: {state.last_preserved_timestamp!r}")
    return ("\n".join(lines) + "\n").encode("utf-8")


_LINE = re.compile(r'\s*([A-Za-z_]+)\s*:\s*(?:"((?:[^"\\]|\\.)*)"|([-+0-9.eEinfINFaA]+))\s*')


def decode_state(data: bytes) -> CheckpointState:
    """Parse the text format; raise DecodeError naming the line that does not parse, or
    if the file is larger than :data:`MAX_STATE_BYTES` or lists more than
    :data:`MAX_STATE_ENTRIES` paths or timestamps."""
    if len(data) > MAX_STATE_BYTES:
        raise DecodeError(f"larger than {MAX_STATE_BYTES} bytes, the most a state file may have")
    state = CheckpointState()
    text = data.decode("utf-8", errors="surrogateescape")
    # split on "\n" only: str.splitlines() would also split at U+2028 and friends,
    # which protobuf's text printer leaves raw inside strings
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _LINE.fullmatch(line)
        if not m:
            raise DecodeError(f"line {lineno} is not a CheckpointState field: {line!r}")
        name, string, number = m.groups()
        try:
            if name == "model_checkpoint_path" and string is not None:
                state.model_checkpoint_path = _unquote(string)
            elif name == "all_model_checkpoint_paths" and string is not None:
                state.all_model_checkpoint_paths.append(_unquote(string))
            elif name == "all_model_checkpoint_timestamps" and number is not None:
                state.all_model_checkpoint_timestamps.append(float(number))
            elif name == "last_preserved_timestamp" and number is not None:
                state.last_preserved_timestamp = float(number)
            else:
                raise DecodeError(f"line {lineno}: unexpected field {line.strip()!r}")
        except ValueError as exc:
            raise DecodeError(f"line {lineno}: {exc}") from exc
        entries = max(len(state.all_model_checkpoint_paths), len(state.all_model_checkpoint_timestamps))
        if entries > MAX_STATE_ENTRIES:
            raise DecodeError(f"line {lineno}: more than {MAX_STATE_ENTRIES} checkpoints listed")
    return state
