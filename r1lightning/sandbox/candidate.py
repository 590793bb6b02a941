"""The candidate runner: the completion's program, alone in its sandboxed process, serving calls.

Started by ``isolation.py`` (after the process is locked down) with ``main(cfg)``. Nothing here is
trusted after the program has run: the program can patch this module, the codec, builtins. That is
fine by design: whatever this process sends is only *the candidate's answer*, decoded by the judge
into plain data; the verdict is decided and reported in another process.

fd 0: the program source (read once, then replaced by /dev/null); fd 1/2: capped pipes to the host;
fd 3: the channel to the judge. Protocol (all values through ``codec``):

    candidate -> judge   ["ready", {name: ["v", value] | ["h", handle]}]  or  ["load_error", type, message]
    judge -> candidate   ["call", seq, handle, args, kwargs] | ["getattr", seq, handle, name] | ["stdio", seq, input]
    candidate -> judge   ["ok", seq, ["v", value] | ["h", handle]]  or  ["err", seq, type, message]
"""

from __future__ import annotations

import builtins
import io
import os
import sys

try:
    from . import codec
except ImportError:  # run as a script by isolation.py
    import codec

CHANNEL = 3


def _describe(exc: BaseException) -> list:
    try:
        name = type(exc).__name__
        name = name if type(name) is str else "Exception"
    except BaseException:  # noqa: BLE001 - anything the program made of its exception
        name = "Exception"
    try:
        msg = str(exc)
        msg = msg if type(msg) is str else ""
    except BaseException:  # noqa: BLE001
        msg = ""
    return [name[:80], msg[:300]]


class _Objects:
    """Handles for results that are not data (functions, instances): the judge refers to them by number."""

    def __init__(self) -> None:
        self.table: list = []

    def wrap(self, value) -> list:
        try:
            return ["v", codec.encode(value)]
        except (codec.CodecError, RecursionError):
            self.table.append(value)
            return ["h", len(self.table) - 1]


def _flush() -> None:
    """The program's prints reach the host before the answer does (the host stops reading at the verdict)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - the program may have replaced or closed them
            pass


def _read_program() -> str:
    chunks = []
    while True:
        b = os.read(0, 1 << 16)
        if not b:
            break
        chunks.append(b)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return b"".join(chunks).decode("utf-8", "replace")


def _run_stdio(code, data: str) -> str:
    stdin = io.TextIOWrapper(io.BytesIO(data.encode()), encoding="utf-8")
    out = io.BytesIO()
    stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    old = sys.stdin, sys.stdout
    sys.stdin, sys.stdout = stdin, stdout
    try:
        exec(code, {"__name__": "__main__", "__builtins__": builtins})
    except SystemExit:
        pass  # exit() after printing the answer is normal for a stdin/stdout program
    finally:
        stdout.flush()
        sys.stdin, sys.stdout = old
    return out.getvalue().decode("utf-8", "replace")


def main(cfg: dict) -> None:
    source = _read_program()
    builtins.exit = builtins.quit = sys.exit  # what `site` (not loaded: python -S) would provide
    objects = _Objects()
    stdio = cfg.get("mode") == "stdio"
    try:
        code = compile(source, "<program>", "exec")
        names = {}
        if not stdio:
            env = {"__name__": "__candidate__", "__builtins__": builtins}
            exec(code, env)
            entry = cfg.get("entry_point")
            wanted = [entry] if entry else [k for k in list(env) if type(k) is str and not k.startswith("__")]
            names = {k: objects.wrap(env[k]) for k in wanted if k in env}
    except BaseException as e:  # noqa: BLE001 - SystemExit and all: the program did not load
        _flush()
        codec.send(CHANNEL, ["load_error", *_describe(e)])
        return
    _flush()
    codec.send(CHANNEL, ["ready", names])
    while True:
        try:
            msg = codec.recv(CHANNEL)
        except (codec.ChannelClosed, OSError):
            return
        op, seq = msg[0], msg[1]
        try:
            if op == "call":
                fn = objects.table[msg[2]]
                args = codec.decode(msg[3])
                kwargs = codec.decode(msg[4])
                reply = ["ok", seq, objects.wrap(fn(*args, **kwargs))]
            elif op == "getattr":
                reply = ["ok", seq, objects.wrap(getattr(objects.table[msg[2]], msg[3]))]
            elif op == "stdio":
                reply = ["ok", seq, ["v", codec.encode(_run_stdio(code, str(codec.decode(msg[2]))))]]
            else:
                reply = ["err", seq, "ProtocolError", f"unknown operation {op!r:.20}"]
        except BaseException as e:  # noqa: BLE001 - the candidate's exception is its answer
            reply = ["err", seq, *_describe(e)]
        _flush()
        codec.send(CHANNEL, reply)
