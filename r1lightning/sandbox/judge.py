"""The judge: runs the (trusted) tests and decides the verdict; never imports or runs candidate code.

Started by ``isolation.py`` in its own sandboxed process with ``main(cfg)``. fd 0: the job (test,
entry point, prelude, mode), fd 3: the channel to the candidate, fd 4: the verdict pipe to the host
(the candidate process has no handle to it). The tests see the candidate through ``Remote`` stubs:
a call or attribute access is sent over the channel and its answer decoded into builtin data, so no
object of the candidate's making ever reaches the judge. Every call has a deadline.

Function mode: the test source runs in a namespace holding the trusted prelude's names (e.g. a
HumanEval prompt's helpers) and, with an entry point, ``candidate`` (the entry point's stub), on
which ``check(candidate)`` is then called; without one, the program's top-level names (data values
as data, functions and other objects as stubs), except names that would shadow a builtin.
Arguments to the candidate must be plain data: a test that passes a function or a candidate object
gets a TypeError (no HumanEval test does). Stdio mode: the test
is ``{"inputs": [...], "outputs": [...]}``; each input is fed to a fresh run of the program and the
printed text compared here, line by line with trailing whitespace ignored.

Units (partial credit): a top-level statement of the test containing a non-constant ``assert`` (of
``check``'s body for HumanEval tests), or one stdio case. When a setup statement fails, or the
candidate is gone or times out, the remaining units fail.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import time

try:
    from . import codec
except ImportError:  # run as a script by isolation.py
    import codec

CHANNEL, VERDICT = 3, 4
_EXEC, _CALL = 0, 1
# Never rebuilt as themselves: they would steer the judge's control flow, e.g. a StopIteration raised
# through map() makes all(map(candidate, xs)) end early and return True.
_PASS_THROUGH = {"SystemExit", "KeyboardInterrupt", "GeneratorExit", "StopIteration", "StopAsyncIteration"}


class CandidateError(Exception):
    """The candidate raised an exception that is not a builtin one (its type name is in ``kind``)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class CandidateGone(Exception):
    """The candidate process exited, broke the protocol, or did not answer in time."""


class Link:
    """The judge's end of the channel; once broken, every later call fails at once."""

    def __init__(self, fd: int, deadline: float, call_timeout: float, max_bytes: int) -> None:
        self.fd, self.deadline, self.call_timeout, self.max_bytes = fd, deadline, call_timeout, max_bytes
        self.broken = ""
        self.seq = 0

    def receive(self):
        if self.broken:
            raise CandidateGone(self.broken)
        try:
            limit = min(self.deadline, time.monotonic() + self.call_timeout)
            return codec.recv(self.fd, limit, self.max_bytes)
        except codec.ChannelTimeout:
            self.broken = "Timeout"
        except (codec.ChannelClosed, OSError):
            self.broken = "CandidateExited"
        except codec.CodecError:
            self.broken = "ProtocolError"
        raise CandidateGone(self.broken)

    def request(self, op: str, *payload):
        if self.broken:
            raise CandidateGone(self.broken)
        self.seq += 1
        try:
            codec.send(self.fd, [op, self.seq, *payload])
        except OSError:
            self.broken = "CandidateExited"
            raise CandidateGone(self.broken) from None
        reply = self.receive()
        try:
            ok = type(reply) is list and len(reply) >= 3 and reply[1] == self.seq and reply[0] in ("ok", "err")
            if ok and reply[0] == "ok" and len(reply) == 3:
                return self.value(reply[2])
            if ok and reply[0] == "err" and len(reply) == 4 and type(reply[2]) is str and type(reply[3]) is str:
                raise _rebuild(reply[2][:80], reply[3][:300])
        except codec.CodecError:
            pass
        self.broken = "ProtocolError"
        raise CandidateGone(self.broken)

    def value(self, wire):
        if type(wire) is list and len(wire) == 2 and wire[0] == "v":
            return codec.decode(wire[1])
        if type(wire) is list and len(wire) == 2 and wire[0] == "h" and type(wire[1]) is int:
            return Remote(self, wire[1])
        raise codec.CodecError("malformed answer")


def _rebuild(kind: str, message: str) -> BaseException:
    """A builtin exception type keeps its identity (``except ValueError`` works); others are wrapped."""
    cls = getattr(builtins, kind, None) if kind.isidentifier() else None
    if isinstance(cls, type) and issubclass(cls, Exception) and kind not in _PASS_THROUGH:
        try:
            return cls(message)
        except Exception:  # noqa: BLE001 - e.g. UnicodeDecodeError needs more arguments
            pass
    return CandidateError(kind, message)


class Remote:
    """A candidate function or object; only calls and attribute reads cross, as data."""

    __slots__ = ("_link", "_handle")

    def __init__(self, link: Link, handle: int) -> None:
        object.__setattr__(self, "_link", link)
        object.__setattr__(self, "_handle", handle)

    def __call__(self, *args, **kwargs):
        try:
            wire_args, wire_kwargs = codec.encode(list(args)), codec.encode(dict(kwargs))
        except codec.CodecError as e:
            raise TypeError(f"the judge can only pass plain data to the candidate: {e}") from None
        return self._link.request("call", self._handle, wire_args, wire_kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__") and name not in ("__name__", "__qualname__", "__doc__"):
            raise AttributeError(name)
        return self._link.request("getattr", self._handle, name)

    def __bool__(self):
        raise TypeError("a candidate object has no truth value in the judge")

    def __repr__(self) -> str:
        return f"<candidate object #{self._handle}>"


def _has_assert(node) -> bool:
    # `assert True, "a note"` lines (common in HumanEval) are not tests.
    return any(isinstance(n, ast.Assert) and not isinstance(n.test, ast.Constant) for n in ast.walk(node))


def _compile(body):
    return compile(ast.Module(body=body, type_ignores=[]), "<test>", "exec")


def plan_units(test: str, entry_point: str | None, partial: bool) -> list:
    """The test as (kind, code or None, counts_as_a_test) units; see the module docstring."""
    tree = ast.parse(test or "", "<test>")
    tail = [(_CALL, None, True)] if entry_point else []
    if not partial:
        return [(_EXEC, _compile(tree.body), entry_point is None)] + tail
    check = None
    if entry_point:
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "check" and len(node.args.args) == 1:
                check = node
    if check is None:
        return [(_EXEC, _compile([s]), _has_assert(s)) for s in tree.body] + tail
    try:  # HumanEval style: check's body runs statement by statement, `candidate` bound as a global
        body = [(_EXEC, _compile([s]), _has_assert(s)) for s in check.body]
    except SyntaxError:  # e.g. a `return` inside check: one unit
        return [(_EXEC, _compile(tree.body), False)] + tail
    rest = [s for s in tree.body if s is not check]
    return [(_EXEC, _compile(rest), False), (_EXEC, compile(f"{check.args.args[0].arg} = candidate", "<test>", "exec"),
                                                 False)] + body  # fmt: skip


def _same_output(got: str, want: str) -> bool:
    def norm(s: str) -> list:
        lines = [ln.rstrip() for ln in s.replace("\r\n", "\n").split("\n")]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    return norm(got) == norm(want)


def _verdict(passed: int, total: int, error: str, message: str = "") -> dict:
    return {"ok": passed == total and not error, "passed": passed, "total": total, "error": error,
            "message": message[:300]}  # fmt: skip


def _judge_stdio(link: Link, test: dict, partial: bool) -> dict:
    inputs, outputs = test["inputs"], test["outputs"]
    passed, error, message = 0, "", ""
    for given, want in zip(inputs, outputs):
        try:
            got = link.request("stdio", codec.encode(str(given)))
            if type(got) is str and _same_output(got, str(want)):
                passed += 1
                continue
            err, msg = "WrongAnswer", ""
        except CandidateGone as e:
            err, msg = str(e), ""
        except Exception as e:  # noqa: BLE001 - the candidate's own exception, rebuilt here
            err, msg = type(e).__name__, str(e)
        error, message = error or err, message or msg
        if not partial or link.broken:
            break
    return _verdict(passed, len(inputs), error, message)


def _run_prelude(source: str) -> dict:
    """The prompt's names. A prompt may end in a bare signature (``def f(x):``): then it gets a body."""
    pre = {"__name__": "__prelude__", "__builtins__": builtins}
    for text in (source, source.rstrip() + "\n    ...\n"):
        try:
            code = compile(text, "<prelude>", "exec")
        except SyntaxError:
            continue
        try:
            exec(code, pre)
        except Exception:  # noqa: BLE001 - keep what it defined; a test needing the rest fails by itself
            pass
        break
    return pre


def _judge_function(link: Link, names: dict, job: dict) -> dict:
    entry, partial = job["entry_point"], job["partial"]
    units = plan_units(job["test"], entry, partial)
    total = sum(1 for u in units if u[2])
    ns = {"__name__": "__judge__", "__builtins__": builtins}
    if entry:  # the tests use `candidate` only
        wanted = [entry] if entry in names else []
    else:  # plain asserts use the program's names; a name that shadows a builtin is not taken
        wanted = [k for k in names if type(k) is str and k.isidentifier() and not hasattr(builtins, k)]
    for k in wanted:
        ns[k] = link.value(names[k])
    if job.get("prelude"):
        ns.update({k: v for k, v in _run_prelude(job["prelude"]).items() if k != entry and not k.startswith("__")})
    if entry:
        if not isinstance(ns.get(entry), Remote):
            return _verdict(0, total, "NameError", f"the program does not define {entry}")
        ns["candidate"] = ns[entry]
    passed, first = 0, None
    for kind, code, counts in units:
        try:
            if kind == _EXEC:
                exec(code, ns)
            else:
                ns["check"](ns["candidate"])
            passed += counts
            continue
        except CandidateGone as e:
            err, msg = str(e), ""
        except Exception as e:  # noqa: BLE001 - a failed assert, or the candidate's exception
            err, msg = type(e).__name__, str(e)
        if not partial or not counts or link.broken:
            return _verdict(passed, total, err, msg)
        first = first or (err, msg)
    return _verdict(passed, total, *(first or ("", "")))


def main(cfg: dict) -> None:
    chunks = []
    while True:
        b = os.read(0, 1 << 16)
        if not b:
            break
        chunks.append(b)
    job = json.loads(b"".join(chunks))
    link = Link(CHANNEL, time.monotonic() + job["timeout"], job["call_timeout"], job["max_message_bytes"])
    verdict = None
    try:
        if job["mode"] == "stdio":
            test = json.loads(job["test"])
            total = len(test["inputs"])
        else:
            total = sum(1 for u in plan_units(job["test"], job["entry_point"], job["partial"]) if u[2])
    except (SyntaxError, ValueError, KeyError, TypeError) as e:
        verdict = _verdict(0, 1, "TestSyntaxError", str(e))
    if verdict is None:
        try:
            hello = link.receive()
            if type(hello) is list and len(hello) == 3 and hello[0] == "load_error":
                verdict = _verdict(0, total, str(hello[1])[:80], str(hello[2])[:300])
            elif type(hello) is list and len(hello) == 2 and hello[0] == "ready" and type(hello[1]) is dict:
                if job["mode"] == "stdio":
                    verdict = _judge_stdio(link, test, job["partial"])
                else:
                    verdict = _judge_function(link, hello[1], job)
            else:
                verdict = _verdict(0, total, "ProtocolError")
        except CandidateGone as e:
            verdict = _verdict(0, total, str(e))
        except codec.CodecError:
            verdict = _verdict(0, total, "ProtocolError")
    os.write(VERDICT, json.dumps(verdict).encode())
    os.close(VERDICT)
