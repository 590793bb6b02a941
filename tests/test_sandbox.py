"""The sandbox under attack, and its parts (codec, judge plan, stdio mode, modes) on their own.

``test_adversarial_suite`` runs every attack in ``ATTACKS`` through the ``code`` reward in one batch
(two workers), with the host armed: a secret in canary files (project checkout, /tmp, home, /run),
in this process's environment and behind TCP, UDP, unix-path and abstract-socket listeners that hand
it to whoever connects. Each attack is written so that it would *score 1.0 if it worked*: the wrong
``add`` ones try to fake a pass, the ``solve`` ones try to fetch the secret the test expects, the
``limits`` ones report whether they got past a limit. They run two at a time (the reward's two
workers); after each pair the canaries must be intact, nothing written, the listeners silent, no
sandbox process left and a bystander process alive. At the end: every attack scored 0.0, honest
answers scored 1.0, and the listeners still work.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pytest

from r1lightning.rewards.code import CodeReward
from r1lightning.sandbox import SandboxUnavailable, codec, host, run_program, sandbox_capabilities
from r1lightning.sandbox.judge import plan_units

REPO = Path(__file__).resolve().parents[1]
CAPS = sandbox_capabilities()
pytestmark = pytest.mark.skipif(CAPS["isolation"] is None, reason=f"no sandbox isolation here: {CAPS['errors']}")
FAST = dict(timeout=3.0, memory_mb=256)

ADD_TEST = ("def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(10, -4) == 6\n"
            "    assert abs(candidate(1.5, 1.5) - 3.0) < 1e-9\n")  # fmt: skip
FLAT_TEST = "import math\nassert add(2, 3) == 5\nassert math.isclose(add(1, 1), 2)\nassert abs(add(0, 7) - 7) < 1e-9\n"
WRONG = "def add(a, b):\n    return -7\n"
FORGE = (  # a verdict and success markers on every fd the process may hold
    "import os, json\ndef forge():\n    v = json.dumps({'ok': True, 'passed': 3, 'total': 3, 'error': '', 'message': ''})\n"
    "    for fd in range(0, 64):\n        for text in (v, 'passed\\n', 'ok 3 3 -\\n'):\n            try:\n"
    "                os.write(fd, text.encode())\n            except OSError:\n                pass\n"
)  # fmt: skip

# name: (kind, program). kind "add": a wrong add against ADD_TEST; "flat": against FLAT_TEST (program
# names are visible); "map": is_even through all(map(...)); "secret": solve() must return the host's secret; "limits": solve() returns
# "broke" if it got past a limit. Placeholders: {paths} {port} {uport} {unix} {abstract} {pid} {bystander}.
ATTACKS = {
    # -- exit(0) in all its forms, before and during the tests
    "sys.exit": ("add", WRONG + "import sys\nsys.exit(0)\n"),
    "os._exit": ("add", WRONG + "import os\nos._exit(0)\n"),
    "raise SystemExit": ("add", WRONG + "raise SystemExit(0)\n"),
    "exit()": ("add", WRONG + "exit()\n"),
    "quit() in call": ("add", "def add(a, b):\n    quit()\n"),
    "os._exit in call": ("add", "import os\ndef add(a, b):\n    os._exit(0)\n"),
    "SIGKILL self": ("add", "import os, signal\ndef add(a, b):\n    os.kill(os.getpid(), signal.SIGKILL)\n"),
    "abort": ("add", "import os\ndef add(a, b):\n    os.abort()\n"),
    # -- interrupts, excepthook, forged reports on every fd and on the channel
    "interrupt_main + forge": ("add", FORGE + "import _thread, sys\nsys.excepthook = lambda *a: forge()\n"
                               "def add(a, b):\n    _thread.interrupt_main()\n    forge()\n    return -7\n"),
    "raise_signal SIGINT": ("add", FORGE + "import signal\ndef add(a, b):\n    forge()\n"
                            "    signal.raise_signal(signal.SIGINT)\n    return -7\n"),
    "forge then exit": ("add", FORGE + WRONG + "forge()\nimport os\nos._exit(0)\n"),
    "forged protocol": ("add", "import os, json\nmsg = json.dumps(['ok', 1, ['v', ['b', True]]]).encode()\n"
                        "os.write(3, len(msg).to_bytes(4, 'big') + msg)\nos.write(3, b'\\x00\\x00\\x00\\x05{}{}{')\n" + WRONG),
    "garbage channel": ("add", "import os\ndef add(a, b):\n    os.write(3, b'\\xff' * 100000)\n    return 5\n"),
    "huge message": ("add", "def add(a, b):\n    return 'x' * (80 << 20)\n"),
    "patched codec": ("add", "def add(a, b):\n    import codec\n    codec.encode = lambda v, depth=0: ['i', '5']\n"
                      "    return 5\n"),
    # -- redefined or patched check/assert/builtins/modules
    "redefine check": ("add", WRONG + "def check(candidate):\n    pass\n"),
    "patch AssertionError": ("add", WRONG + "import builtins\nbuiltins.AssertionError = type('N', (Exception,), {})\n"),
    "patch abs": ("add", WRONG + "import builtins\nbuiltins.abs = lambda x: 0\n__builtins__ = {'abs': abs}\n"),
    "shadow builtins (flat)": ("flat", WRONG + "def abs(x):\n    return 0\ndef isinstance(*a):\n    return True\n"),
    "patch math.isclose (flat)": ("flat", WRONG + "import math\nmath.isclose = lambda *a, **k: True\n"),
    "planted module (flat)": ("flat", WRONG + "import sys, types\nm = types.ModuleType('math')\n"
                              "m.isclose = lambda *a, **k: True\nsys.modules['math'] = m\nmath = m\n"),
    # -- always-equal and subclassed return values
    "always-equal object": ("add", "class E:\n    def __eq__(self, o):\n        return True\n"
                            "    __hash__ = object.__hash__\n    def __sub__(self, o):\n        return 0\n"
                            "def add(a, b):\n    return E()\n"),
    "int subclass": ("add", "class I(int):\n    def __eq__(self, o):\n        return True\n    __hash__ = int.__hash__\n"
                     "    def __sub__(self, o):\n        return 0\ndef add(a, b):\n    return I(0)\n"),
    "float subclass": ("add", "class F(float):\n    def __eq__(self, o):\n        return True\n"
                       "    __hash__ = float.__hash__\ndef add(a, b):\n    return F(0.0)\n"),
    "str/list subclass": ("add", "class S(str):\n    def __eq__(self, o):\n        return True\n"
                          "class L(list):\n    def __eq__(self, o):\n        return True\n"
                          "def add(a, b):\n    return L([S('x')])\n"),
    "return a function": ("add", "def add(a, b):\n    return add\n"),
    "StopIteration through map": ("map", "def is_even(x):\n    raise StopIteration\n"),
    "deeply nested answer": ("add", "def add(a, b):\n    x = []\n    for _ in range(10 ** 5):\n        x = [x]\n    return x\n"),
    "answer that floods the judge": ("add", "def add(a, b):\n    return [[0] * 1000] * 5000\n"),
    # -- reaching into the harness: frames, gc, expected values from the test's code, ctypes
    "frame walk for expected values": ("add", "import sys\ndef add(a, b):\n    f, found = sys._getframe(), []\n"
                                       "    while f is not None:\n        found += [c for c in f.f_code.co_consts if type(c) is int]\n"
                                       "        found += [v for v in f.f_locals.values() if type(v) is int]\n"
                                       "        f = f.f_back\n    return found[-1] if found else -7\n"),
    "frame walk patching globals": ("add", "import sys\ndef add(a, b):\n    f = sys._getframe()\n    while f is not None:\n"
                                    "        g = f.f_globals\n        for k in list(g):\n            if callable(g[k]) and k in "
                                    "('send', 'encode', 'wrap'):\n                g[k] = (lambda *a, **k: None)\n"
                                    "        f = f.f_back\n    return -7\n"),
    "gc walk": ("add", "import gc\ndef add(a, b):\n    for o in gc.get_objects():\n        if isinstance(o, dict) and 'ok' in o:\n"
                "            o['ok'] = True\n    return -7\n"),
    "ctypes memory": ("add", "import ctypes\nlibc = ctypes.CDLL(None)\n"
                      "def add(a, b):\n    libc.kill({pid}, 9)\n    libc.ptrace(16, {pid}, 0, 0)\n"
                      "    ctypes.memset(id(5) + 24, 0, 4)\n    return -7\n"),
    # -- host: signals, ptrace, privilege
    "signals to the host": ("add", "import os\nfor p in ({pid}, {bystander}, -1, 1):\n    try:\n        os.kill(p, 9)\n"
                            "    except OSError:\n        pass\ntry:\n    os.killpg(os.getpgid(0), 9)\nexcept OSError:\n    pass\n" + WRONG),
    "ptrace and setuid": ("add", "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                          "for p in ({pid}, {bystander}, 1):\n    libc.ptrace(16, p, 0, 0)\n"
                          "for f in (lambda: os.setuid(0), lambda: os.unshare(os.CLONE_NEWUSER) if hasattr(os, 'unshare') else 0):\n"
                          "    try:\n        f()\n    except OSError:\n        pass\n"
                          "libc.mount(b'proc', b'/tmp', b'proc', 0, None)\n" + WRONG),
    # -- host reads: the secret sits in files, the environment, /proc and behind listeners
    "read canary files": ("secret", "def solve():\n    for p in {paths}:\n        try:\n            return open(p).read()\n"
                          "        except OSError:\n            pass\n    return 'nothing'\n"),
    "environment": ("secret", "import os\ndef solve():\n    return os.environ.get('R1_SBX_SECRET', 'nothing')\n"),
    "/proc walk": ("secret", "import os, glob\ndef solve():\n    for p in glob.glob('/proc/*/environ') + glob.glob('/proc/*/cmdline')"
                   " + ['/proc/{pid}/environ']:\n        try:\n            t = open(p, 'rb').read().decode('latin1')\n"
                   "        except OSError:\n            continue\n        if 'R1_SBX_SECRET=' in t:\n"
                   "            return t.split('R1_SBX_SECRET=')[1].split('\\x00')[0]\n    return 'nothing'\n"),
    "/proc/pid/mem": ("secret", "def solve():\n    try:\n        return open('/proc/{pid}/mem', 'rb').read(10).decode()\n"
                      "    except OSError:\n        return 'nothing'\n"),
    "walk the filesystem": ("secret", "import os\ndef solve():\n    for top in ('/', '/work', '/root', '/home', '/run', '/sys'):\n"
                            "        for d, _, files in os.walk(top):\n            for f in files:\n"
                            "                if f.startswith('sbx-canary') or f.startswith('.sbx-canary'):\n"
                            "                    try:\n                        return open(os.path.join(d, f)).read()\n"
                            "                    except OSError:\n                        pass\n    return 'nothing'\n"),
    "TCP": ("secret", "import socket\ndef solve():\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    s.sendall(b'exfil')\n    return s.recv(100).decode()\n"),
    "UDP": ("secret", "import socket\ndef solve():\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    s.settimeout(1)\n"
            "    s.sendto(b'exfil', ('127.0.0.1', {uport}))\n    return s.recv(100).decode()\n"),
    "unix path socket": ("secret", "import socket\ndef solve():\n    for p in {unix}:\n        try:\n"
                         "            s = socket.socket(socket.AF_UNIX)\n            s.connect(p)\n            s.sendall(b'exfil')\n"
                         "            return s.recv(100).decode()\n        except OSError:\n            pass\n    return 'nothing'\n"),
    "abstract socket": ("secret", "import socket\ndef solve():\n    s = socket.socket(socket.AF_UNIX)\n"
                        "    s.connect({abstract!r})\n    s.sendall(b'exfil')\n    return s.recv(100).decode()\n"),
    # -- host writes
    "overwrite canaries": ("add", "import os\nfor p in {paths} + ['/tmp/sbx-pwned', '{repo}/sbx-pwned']:\n"
                           "    try:\n        open(p, 'w').write('pwned')\n    except OSError:\n        pass\n" + WRONG),
    # -- limits: memory and processes summed over the sandbox, floods, strays after a timeout
    "memory bomb": ("limits", "def solve():\n    try:\n        x = bytearray(1 << 30)\n        return 'broke'\n"
                    "    except MemoryError:\n        return 'held'\n"),
    "memory over processes": ("limits", "import os\ndef solve():\n    held = 0\n    for _ in range(6):\n"
                              "        r, w = os.pipe()\n        try:\n            pid = os.fork()\n        except OSError:\n"
                              "            continue\n        if pid == 0:\n            try:\n                x = bytearray(150 << 20)\n"
                              "                os.write(w, b'1')\n            except MemoryError:\n                os.write(w, b'0')\n"
                              "            import time\n            time.sleep(5)\n            os._exit(0)\n"
                              "        held += os.read(r, 1) == b'1'\n    return 'broke' if held >= 2 else 'held'\n"),
    "fork bomb": ("limits", "import os\ndef solve():\n    n = 0\n    for _ in range(200):\n        try:\n"
                  "            if os.fork() == 0:\n                import time\n                time.sleep(30)\n"
                  "                os._exit(0)\n            n += 1\n        except OSError:\n            break\n"
                  "    return 'broke' if n > 40 else 'held'\n"),
    "thread bomb": ("limits", "import threading, time\ndef solve():\n    n = 0\n    for _ in range(200):\n        try:\n"
                    "            threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n            n += 1\n"
                    "        except RuntimeError:\n            break\n    return 'broke' if n > 40 else 'held'\n"),
    "output flood": ("add", "import sys, os\nfor _ in range(300):\n    sys.stdout.write('x' * 100000)\n"
                     "    os.write(2, b'y' * 100000)\n" + WRONG),
    "stray processes after a timeout": ("add", "import os, time\ntry:\n    if os.fork() == 0:\n        os.setsid()\n"
                                        "        time.sleep(60)\nexcept OSError:\n    pass\n"
                                        "def add(a, b):\n    while True:\n        pass\n"),
    "sleeping past the deadline": ("add", "import time\ndef add(a, b):\n    time.sleep(60)\n"),
}
HONEST = {
    "honest": ("add", "def add(a, b):\n    return a + b\n"),
    "honest with prints and files": ("add", "import os\nprint('hello')\nopen('/tmp/scratch', 'w').write('ok')\n"
                                     "def add(a, b):\n    return a + b\n"),
    "honest flat": ("flat", "def add(a, b):\n    return a + b\n"),
    "honest map": ("map", "def is_even(x):\n    return x % 2 == 0\n"),
}


class Listeners:
    """TCP, UDP, unix-path and abstract sockets that give the secret to anyone and record what came in."""

    def __init__(self, secret: str, tmp: Path) -> None:
        self.secret, self.heard, self.stop = secret.encode(), [], threading.Event()
        tcp = socket.socket()
        tcp.bind(("127.0.0.1", 0))
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        self.unix = [str(tmp / "sbx.sock")] + (["/run/sbx-test.sock"] if os.access("/run", os.W_OK) else [])
        self.abstract = "\0sbx-" + secrets.token_hex(6)
        streams = [tcp]
        for path in self.unix + [self.abstract]:
            s = socket.socket(socket.AF_UNIX)
            if not path.startswith("\0") and os.path.exists(path):
                os.unlink(path)
            s.bind(path)
            streams.append(s)
        for s in streams:
            s.listen(8)
        self.port, self.uport = tcp.getsockname()[1], udp.getsockname()[1]
        self.socks = streams + [udp]
        self.udp = udp
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import select

        while not self.stop.is_set():
            for s in select.select(self.socks, [], [], 0.05)[0]:
                if s is self.udp:
                    data, addr = s.recvfrom(100)
                    self.heard.append(data)
                    s.sendto(self.secret, addr)
                    continue
                conn, _ = s.accept()
                conn.settimeout(1)
                try:
                    self.heard.append(conn.recv(100))
                    conn.sendall(self.secret)
                except OSError:
                    pass
                conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for s in self.socks:
            s.close()
        for p in self.unix:
            if os.path.exists(p):
                os.unlink(p)


def sandbox_processes() -> list[str]:
    """Live processes of a sandbox: a per-run uid, or our isolation script on the command line."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid, state = int(fields["Uid"].split()[0]), fields["State"].split()[0]
        if state != "Z" and (host._UID_BASE <= uid < host._UID_BASE + host._UID_SPAN or b"isolation.py" in cmd):
            found.append(f"{pid} uid={uid} {cmd[:80]!r}")
    return found


def _fill(program: str, values: dict) -> str:
    program = program.replace("{abstract!r}", repr(values.get("abstract", "")))
    for k, v in values.items():
        program = program.replace("{" + k + "}", str(v))
    return program


def _tests(secret: str) -> dict:
    return {"add": (ADD_TEST, "add"), "flat": (FLAT_TEST, None),
            "secret": (f"def check(candidate):\n    assert candidate() == {secret!r}\n", "solve"),
            "limits": ("def check(candidate):\n    assert candidate() == 'broke'\n", "solve"),
            "map": ("assert all(map(lambda x: is_even(x) == (x % 2 == 0), range(10)))\n", None)}  # fmt: skip


def _host_harm(secret: str, canaries: list, listeners: Listeners, bystander) -> list[str]:
    """What an attack did to the host: changed canaries, new files, traffic, stray or killed processes."""
    harm = [f"canary {c} changed" for c in canaries if c.read_text() != secret]
    harm += [f"{p} written" for p in (Path("/tmp/sbx-pwned"), REPO / "sbx-pwned") if p.exists()]
    harm += [f"a listener heard {m!r}" for m in listeners.heard]
    deadline = time.monotonic() + 5.0
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.02)
    harm += [f"process left: {p}" for p in sandbox_processes()]
    return harm + (["the bystander died"] if bystander.poll() is not None else [])


@pytest.fixture
def armed_host(tmp_path, monkeypatch):
    secret = secrets.token_hex(16)
    canaries = [REPO / ".sbx-canary", tmp_path / "sbx-canary", Path("/tmp") / f"sbx-canary-{secret[:6]}"]
    home = Path.home()
    if os.access(home, os.W_OK):
        canaries.append(home / ".sbx-canary")
    if os.access("/run", os.W_OK):
        canaries.append(Path("/run") / "sbx-canary")
    for c in canaries:
        c.write_text(secret)
    monkeypatch.setenv("R1_SBX_SECRET", secret)
    listeners = Listeners(secret, tmp_path)
    bystander = subprocess.Popen(["sleep", "120"])
    try:
        yield secret, canaries, listeners, bystander
    finally:
        bystander.kill()
        bystander.wait()
        listeners.close()
        for c in canaries:
            c.unlink(missing_ok=True)


def test_adversarial_suite(armed_host):
    secret, canaries, listeners, bystander = armed_host
    fill = dict(paths=repr([str(c) for c in canaries]), port=listeners.port, uport=listeners.uport,
                unix=repr(listeners.unix), abstract=listeners.abstract, pid=os.getpid(), bystander=bystander.pid,
                repo=str(REPO))  # fmt: skip
    cases = {**ATTACKS, **HONEST}
    tests = _tests(secret)
    names = list(cases)
    programs = [_fill(cases[n][1], fill) for n in names]
    kinds = [cases[n][0] for n in names]
    reward = CodeReward(max_workers=2, **FAST)
    got, results, harm = {}, {}, {}
    t0 = time.monotonic()
    for i in range(0, len(names), 2):  # two at a time (the two workers), the host checked after each pair
        pair = names[i : i + 2]
        scores = reward(None, [programs[names.index(n)] for n in pair], test=[tests[cases[n][0]][0] for n in pair],
                        entry_point=[tests[cases[n][0]][1] for n in pair])  # fmt: skip
        for n, score, r in zip(pair, scores, reward.last_results):
            got[n], results[n] = (score, r.status, r.error), r
        problems = _host_harm(secret, canaries, listeners, bystander)
        if problems:
            harm[" + ".join(pair)] = problems
    took = time.monotonic() - t0
    print(f"{len(ATTACKS)} attacks + {len(HONEST)} honest answers in {took:.1f}s")
    for n, g in got.items():
        print(f"  {n:<34} {g}")
    assert harm == {}
    assert {n: got[n] for n in ATTACKS if got[n][0] != 0.0} == {}
    assert {n: got[n] for n in HONEST if got[n][0] != 1.0} == {}
    assert all(r.status != "error" for r in results.values()), got  # the sandbox itself held up
    for r in results.values():
        assert secret not in r.stdout + r.stderr
        assert len(r.stdout) <= host.SandboxConfig.max_output_bytes and len(r.stderr) <= host.SandboxConfig.max_output_bytes
    assert got["output flood"][0] == 0.0 and results["output flood"].output_truncated
    with socket.create_connection(("127.0.0.1", listeners.port), timeout=2) as c:  # the listeners still work
        c.sendall(b"host")
        assert c.recv(100) == secret.encode()
    # a timeout is a timeout, a crash a crash: the statuses say what happened
    assert got["sleeping past the deadline"][1] == "timeout"
    assert got["stray processes after a timeout"][1] in ("timeout", "killed")  # the call timeout or RLIMIT_CPU


# ---------------------------------------------------------------------------------------- the parts


def test_codec_round_trip_and_refusals():
    value = [None, True, False, 0, -(10**5000), 2**64, 1.5, float("inf"), -0.0, "é\x00", b"\xff\x00", (1, (2,)),
             {"a": [1, {2, 3}], (1, "b"): frozenset({4})}, set()]  # fmt: skip
    wire = json.loads(json.dumps(codec.encode(value)))
    back = codec.decode(wire)
    assert back == value and type(back[11]) is tuple and type(back[12][(1, "b")]) is frozenset
    assert codec.decode(codec.encode(float("nan"))) != codec.decode(codec.encode(float("nan")))  # a real nan

    class I(int):
        pass

    for bad in (I(1), object(), print, [1, I(2)], {"k": object()}, bytearray(b"x")):
        with pytest.raises(codec.CodecError):
            codec.encode(bad)
    for wire in (["i", "5x"], ["i", "1_0"], ["f", "1e5; import os"], ["b", 1], ["x", 1], ["S", [["l", []]]],
                 ["d", [[["l", []], ["n"]]]], "s", ["l", {}], ["n", 1], [["s", "a"]]):  # fmt: skip
        with pytest.raises(codec.CodecError):
            codec.decode(wire)
    deep = ["n"]
    for _ in range(200):
        deep = ["l", [deep]]
    with pytest.raises(codec.CodecError):
        codec.decode(deep)


def test_plan_units():
    units = plan_units(ADD_TEST, "add", partial=True)
    assert [u[2] for u in units] == [False, False, True, True, True]
    assert [u[2] for u in plan_units("x = 1\nassert x\nassert True, 'note'\n", None, True)] == [False, True, False]
    assert [u[2] for u in plan_units(ADD_TEST, "add", partial=False)] == [False, True]


def test_statuses_partial_credit_and_errors():
    r = run_program("def add(a, b):\n    return a + b\n", test=ADD_TEST, entry_point="add", **FAST)
    assert (r.passed, r.status, r.tests_passed, r.tests_total) == (True, "passed", 1, 1)
    half = "def add(a, b):\n    return 5 if a == 2 else a * b\n"
    r = run_program(half, test=ADD_TEST, entry_point="add", partial=True, **FAST)
    assert (r.status, r.tests_passed, r.tests_total, r.error) == ("failed", 1, 3, "AssertionError")
    r = run_program("def add(a, b):\n    raise ValueError('no')\n", test=ADD_TEST, entry_point="add", **FAST)
    assert (r.status, r.error, r.message) == ("failed", "ValueError", "no")
    r = run_program("def add(a, b):\n    return a +\n", test=ADD_TEST, entry_point="add", **FAST)
    assert (r.status, r.error) == ("failed", "SyntaxError")
    r = run_program("def plus(a, b):\n    return a + b\n", test=ADD_TEST, entry_point="add", **FAST)
    assert r.error == "NameError"
    assert run_program("x = 1", test="assert (", **FAST).error == "TestSyntaxError"
    # a builtin exception keeps its type in the judge: tests may expect it
    expects = "def check(candidate):\n    try:\n        candidate(-1)\n        assert False\n    except ValueError:\n        pass\n"
    assert run_program("def f(x):\n    raise ValueError(x)\n", test=expects, entry_point="f", **FAST).passed
    r = run_program("while True:\n    pass\n", test="assert True", timeout=4.0, cpu_time=1)
    assert r.status == "killed" and r.duration < 3.5  # RLIMIT_CPU, well before the wall clock


def test_objects_and_attributes_cross_as_stubs():
    prog = ("class Solution:\n    limit = 3\n    def twice(self, x):\n        return 2 * x\n"
            "def add(a, b):\n    return a + b\nTABLE = {'a': (1, 2)}\n")  # fmt: skip
    test = ("s = Solution()\nassert s.twice(4) == 8 and s.limit == 3 and Solution.limit == 3\n"
            "assert add.__name__ == 'add' and TABLE == {'a': (1, 2)}\n")  # fmt: skip
    assert run_program(prog, test=test, **FAST).passed
    # candidate objects have no truth value, no equality with data, and cannot be sent back
    for bad in ("assert Solution()", "assert Solution() == Solution()", "assert add(Solution(), 1)", "assert add(len, 1)"):
        r = run_program(prog, test=bad, **FAST)
        assert not r.passed and r.error in ("TypeError", "AssertionError"), (bad, r.error)


def test_prelude_helpers_come_from_the_judge():
    prelude = "def helper(x):\n    return 2 * x\n\ndef f(x):\n    '''doc'''\n"
    test = "def check(candidate):\n    assert helper(candidate(3)) == 12\n"
    hack = prelude + "def helper(x):\n    return 12\n\ndef f(x):\n    return 0\n"
    assert not run_program(hack, test=test, entry_point="f", prelude=prelude, **FAST).passed
    assert run_program(prelude + "def f(x):\n    return 2 * x\n", test=test, entry_point="f", prelude=prelude, **FAST).passed
    # a prompt that is a bare signature is still a usable prelude
    bare = "import math\ndef f(x):\n"
    test = "def check(candidate):\n    assert candidate(4) == math.sqrt(16)\n"
    assert run_program(bare + "    return 4.0\n", test=test, entry_point="f", prelude=bare, **FAST).passed


def test_stdio_programs():
    spec = json.dumps({"inputs": ["1 2\n", "5 7\n", "0 0\n"], "outputs": ["3\n", "12", "0\n\n"]})
    good = "a, b = map(int, input().split())\nprint(a + b)\nexit(0)\n"
    reward = CodeReward(partial_credit=True, max_workers=2, **FAST)
    whole = "import sys\nprint(sum(map(int, sys.stdin.read().split())))\n"
    flood = "print('x' * 10 ** 8)\n"
    scores = reward(None, [good, "print(3)\n", whole, flood, "import os\nos._exit(0)\n"], test=[spec] * 5)
    assert scores == [1.0, pytest.approx(1 / 3), 1.0, 0.0, 0.0]
    assert CodeReward(**FAST)(None, ["print(3)\n"], test=[spec]) == [0.0]
    with pytest.raises(ValueError, match="call-based test"):
        CodeReward(**FAST)(None, ["x = 1"], test=[json.dumps({"inputs": [[1]], "outputs": [2], "fn_name": "f"})])


def test_refuses_without_isolation_unless_weak(monkeypatch):
    missing = {"root": False, "isolation": None, "errors": {"userns": "unshare: Operation not permitted"}, "cgroup": None}
    monkeypatch.setattr(host, "sandbox_capabilities", lambda *a, **k: missing)
    with pytest.raises(SandboxUnavailable, match="userns: unshare: Operation not permitted.*isolation='weak'"):
        run_program("x = 1", test="assert x == 1", **FAST)
    with pytest.raises(ValueError, match="unknown sandbox isolation"):
        run_program("x = 1", test="assert x == 1", isolation="chroot", **FAST)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        host._mode(host.SandboxConfig(isolation="weak"))
    assert "no mount, network or PID namespace" in str(caught[0].message)


def test_broken_sandbox_is_an_error_not_a_verdict(monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(host, "ISOLATION_SCRIPT", "/nonexistent/isolation.py")
        r = run_program("x = 1", test="assert x == 1", **FAST)
        assert r.status == "error" and not r.passed
    for code in (0, 1, 121, 137):  # the program's own exit codes never pose as sandbox errors
        r = run_program(f"import os\nos._exit({code})\n", test="assert True", **FAST)
        assert r.status in ("failed", "killed") and not r.passed, (code, r.status, r.error)


def _unprivileged_python() -> str | None:
    for exe in ("/usr/bin/python3", "/usr/local/bin/python3"):
        real = os.path.realpath(exe)
        if os.access(real, os.X_OK) and os.stat(real).st_mode & 0o005 == 0o005:
            return exe
    return None


@pytest.mark.skipif(os.geteuid() != 0 or not _unprivileged_python() or not os.path.exists("/usr/bin/setpriv"),
                    reason="needs root, setpriv and a world-readable python to become an unprivileged user")  # fmt: skip
def test_runs_as_an_unprivileged_user():
    """As uid 65534 (nobody): user-namespace isolation, the same attacks fail, honest code passes."""
    # The checkout may sit under a directory other users cannot enter (mktemp -d is 0700): uid 65534
    # imports a copy of the self-contained sandbox package from a directory it can read.
    script = (
        "import json, sys\nsys.path.insert(0, sys.argv[1])\nfrom sandbox import host\n"
        "caps = host.sandbox_capabilities()\nif caps['isolation'] is None:\n    print(json.dumps({'caps': caps}))\n"
        "    sys.exit(0)\nout = {'caps': caps, 'results': []}\nfor prog, test, entry in json.loads(sys.argv[2]):\n"
        "    r = host.run_program(prog, test=test, entry_point=entry, timeout=3.0, memory_mb=256)\n"
        "    out['results'].append([r.status, r.isolation, r.error])\nimport warnings\nwarnings.simplefilter('ignore')\n"
        "prog, test, entry = json.loads(sys.argv[2])[0]\n"
        "out['weak'] = host.run_program(prog, test=test, entry_point=entry, timeout=3.0, isolation='weak').status\n"
        "print(json.dumps(out))\n"
    )  # fmt: skip
    cases = [["def add(a, b):\n    return a + b\n", ADD_TEST, "add"],
             [ATTACKS["memory over processes"][1], _tests("x")["limits"][0], "solve"],
             [ATTACKS["walk the filesystem"][1], _tests("x")["secret"][0], "solve"],
             [WRONG + "import os\nos._exit(0)\n", ADD_TEST, "add"]]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        shared = Path(tmp)
        shutil.copytree(REPO / "r1lightning" / "sandbox", shared / "sandbox", ignore=shutil.ignore_patterns("__pycache__"))
        for d in [shared, *shared.rglob("*")]:
            d.chmod(0o755 if d.is_dir() else 0o644)
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", _unprivileged_python(), "-I",
                               "-", str(shared), json.dumps(cases)],
                              input=script, capture_output=True, text=True, timeout=120, cwd="/")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    if out["caps"]["isolation"] is None:
        pytest.skip(f"user namespaces not allowed here: {out['caps']['errors']}")
    assert out["caps"]["isolation"] == "userns"
    statuses = [r[0] for r in out["results"]]
    assert statuses[0] == "passed" and all(s != "passed" and s != "error" for s in statuses[1:]), out
    assert out["weak"] == "passed"  # the opt-in weak mode runs too (rlimits only)
    assert sys.executable  # and we are still here
