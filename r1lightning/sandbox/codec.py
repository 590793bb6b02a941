"""The data-only channel between the judge and the candidate: a literal codec and message framing.

Values: None, bool, int, float, str, bytes, list, tuple, dict, set (frozenset too). The encoder
accepts exactly these types (``type(x) is int``, never a subclass); the decoder builds fresh builtin
objects from parsed JSON, so nothing with its own ``__eq__``, ``__hash__`` or ``__del__`` crosses.
Anything else raises ``CodecError``. Wire form: every value is a tagged JSON list; ints are hex text
(no digit limit), floats their ``repr`` (``inf``/``nan`` included).

A message is a 4-byte big-endian length plus UTF-8 JSON; ``recv`` takes a deadline and a size cap.
This module is standard library only and imports nothing from the project: the sandboxed processes
load it before their filesystem is taken away.
"""

from __future__ import annotations

import json
import os
import select
import time

__all__ = ["CodecError", "ChannelClosed", "ChannelTimeout", "encode", "decode", "send", "recv"]

MAX_DEPTH = 100
_HEADER = 4


class CodecError(ValueError):
    """A value outside the literal types, or a malformed message."""


class ChannelClosed(EOFError):
    """The other side went away."""


class ChannelTimeout(TimeoutError):
    """No complete message before the deadline."""


def encode(value, depth: int = 0):
    """A value as tagged JSON-ready lists; raises CodecError for anything but the literal types."""
    if depth > MAX_DEPTH:
        raise CodecError("value nested too deeply")
    t = type(value)
    if value is None:
        return ["n"]
    if t is bool:
        return ["b", value]
    if t is int:
        return ["i", format(value, "x")]
    if t is float:
        return ["f", repr(value)]
    if t is str:
        return ["s", value]
    if t is bytes:
        return ["y", value.hex()]
    if t is list or t is tuple or t is set or t is frozenset:
        tag = {list: "l", tuple: "t", set: "S", frozenset: "F"}[t]
        return [tag, [encode(v, depth + 1) for v in value]]
    if t is dict:
        return ["d", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]]
    raise CodecError(f"cannot send a {t.__name__!s:.40} (only None/bool/int/float/str/bytes/list/tuple/dict/set)")


_FLOATS = frozenset({"inf", "-inf", "nan"})


def _hashable(v) -> None:
    if type(v) in (list, dict, set):
        raise CodecError("unhashable key")
    if type(v) is tuple:
        for x in v:
            _hashable(x)


def decode(wire, depth: int = 0):
    """Build builtin objects from parsed JSON (the output of ``encode``, or anything hostile)."""
    if depth > MAX_DEPTH:
        raise CodecError("value nested too deeply")
    if type(wire) is not list or not wire or type(wire[0]) is not str:
        raise CodecError("malformed value")
    tag, body = wire[0], wire[1:]
    if tag == "n" and not body:
        return None
    if len(body) != 1:
        raise CodecError("malformed value")
    x = body[0]
    if tag == "b" and type(x) is bool:
        return True if x else False
    if tag == "i" and type(x) is str and 0 < len(x) <= 1 << 20:
        digits = x[1:] if x[0] == "-" else x
        if digits and all(c in "0123456789abcdef" for c in digits):
            return int(x, 16)
    if tag == "f" and type(x) is str and len(x) <= 40:
        if x in _FLOATS or all(c in "0123456789.e+-" for c in x):
            try:
                return float(x)
            except ValueError:
                pass
    if tag == "s" and type(x) is str:
        return str(x)
    if tag == "y" and type(x) is str:
        try:
            return bytes.fromhex(x)
        except ValueError:
            pass
    if tag in ("l", "t", "S", "F") and type(x) is list:
        items = [decode(v, depth + 1) for v in x]
        if tag == "l":
            return items
        if tag == "t":
            return tuple(items)
        for v in items:
            _hashable(v)
        return set(items) if tag == "S" else frozenset(items)
    if tag == "d" and type(x) is list:
        out = {}
        for pair in x:
            if type(pair) is not list or len(pair) != 2:
                raise CodecError("malformed dict item")
            k = decode(pair[0], depth + 1)
            _hashable(k)
            out[k] = decode(pair[1], depth + 1)
        return out
    raise CodecError(f"malformed value (tag {tag!r:.10})")


def send(fd: int, message) -> None:
    """Write one message: a JSON-ready object (lists/str/int/bool/None of our own making)."""
    data = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
    data = len(data).to_bytes(_HEADER, "big") + data
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes:
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise ChannelTimeout("no answer before the deadline")
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise ChannelClosed("channel closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv(fd: int, deadline: float | None = None, max_bytes: int = 64 << 20):
    """Read one message (parsed JSON, not yet ``decode``d); None deadline waits forever."""
    size = int.from_bytes(_read_exact(fd, _HEADER, deadline), "big")
    if size > max_bytes:
        raise CodecError(f"message of {size} bytes exceeds the {max_bytes}-byte limit")
    raw = _read_exact(fd, size, deadline)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CodecError(f"malformed message: {type(e).__name__}") from None
