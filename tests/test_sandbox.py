"""Adversarial tests for the code-execution sandbox.

Every attack is written so that it would *pass* (score 1.0) if it worked; the sandbox must turn each
into a non-pass, within its time limit, with the host and this test process unaffected.
"""

from __future__ import annotations

import dis
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from r1lightning.rewards import sandbox as sb
from r1lightning.rewards.sandbox import SandboxConfig, SandboxJob, run_program, run_programs

CAPS = sb.sandbox_capabilities()
NS = CAPS["namespaces"]
needs_ns = pytest.mark.skipif(not NS, reason="namespace isolation (root + unshare) not available")
REPO = Path(__file__).resolve().parents[1]
FAST = dict(timeout=3.0, memory_mb=256, max_processes=16)

GOOD = "def add(a, b):\n    return a + b\n"
TEST = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
WRONG = "def add(a, b):\n    return -7\n"
HE_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(0, 0) == 0\n"


def sandbox_uid_processes() -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid, state = int(fields["Uid"].split()[0]), fields["State"].split()[0]
        if sb._UID_BASE <= uid < sb._UID_BASE + sb._UID_SPAN and state != "Z":
            pids.append(int(pid))
    return pids


def assert_blocked(r, limit: float) -> None:
    assert not r.passed, (r.status, r.stdout[-300:], r.stderr[-300:])
    assert r.status != "passed"
    assert r.duration < limit + 2.0, r.duration


# ---------------------------------------------------------------- baseline: the harness works at all


def test_baseline_pass_and_fail():
    ok = run_program(GOOD, test=TEST, **FAST)
    assert (ok.passed, ok.status, ok.tests_passed, ok.tests_total) == (True, "passed", 1, 1)
    bad = run_program(GOOD.replace("a + b", "a - b"), test=TEST, **FAST)
    assert (bad.passed, bad.status, bad.error) == (False, "failed", "AssertionError")
    he = run_program(GOOD, test=HE_TEST, entry_point="add", **FAST)
    assert he.passed and he.status == "passed"
    assert ok.isolation == CAPS["isolation"]


def test_partial_counts_units():
    prog = "def f(x):\n    return 1 if x < 3 else 0\n"
    test = "\n".join(f"assert f({i}) == 1" for i in range(4))
    r = run_program(prog, test=test, partial=True, **FAST)
    assert (r.status, r.tests_passed, r.tests_total) == ("failed", 3, 4)


# ------------------------------------------------------------------------------ resources and time


def test_infinite_loop_hits_cpu_limit():
    r = run_program("while True:\n    pass\n", test="assert True", timeout=4.0, cpu_time=1)
    assert_blocked(r, 4.0)
    assert r.status == "killed" and r.duration < 3.5  # RLIMIT_CPU fired well before the wall clock


def test_sleeping_loop_hits_wall_clock():
    r = run_program("import time\nwhile True:\n    time.sleep(0.05)\n", test="assert True", timeout=1.5)
    assert_blocked(r, 1.5)
    assert r.status == "timeout"


def test_memory_bomb():
    prog = "blob = bytearray(2 * 1024 ** 3)\n" + GOOD
    r = run_program(prog, test=TEST, **FAST)
    assert_blocked(r, FAST["timeout"])
    assert r.error == "MemoryError"
    grow = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 1024 ** 2))\n" + GOOD
    r = run_program(grow, test=TEST, **FAST)
    assert_blocked(r, FAST["timeout"])
    assert r.error == "MemoryError"


def test_huge_output_is_capped():
    r = run_program("while True:\n    print('x' * 100000)\n", test="assert True", timeout=2.0,
                    max_output_bytes=10_000)  # fmt: skip
    assert_blocked(r, 2.0)
    assert r.output_truncated and len(r.stdout) <= 10_000
    # A huge write followed by a correct program: output is dropped, the verdict still comes back.
    r = run_program("import sys\nsys.stdout.write('y' * 50_000_000)\n" + GOOD, test=TEST, timeout=10.0,
                    max_output_bytes=10_000)  # fmt: skip
    assert r.passed and len(r.stdout) == 10_000


@needs_ns
def test_process_limit_really_holds():
    # Harmless probe first: forks that just sleep, counted by the program itself.
    probe = (
        "import os, time\nmade = 0\nfor _ in range(30):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        continue\n    if pid == 0:\n        time.sleep(2)\n        os._exit(0)\n"
        "    made += 1\nprint('forked', made)\n"
    )  # fmt: skip
    r = run_program(probe, test="assert True", timeout=5.0, max_processes=6, harden=False)
    assert r.passed, r.stderr
    assert r.stdout.strip() == "forked 4"  # 6 tasks of the sandbox uid minus harness main + worker


@needs_ns
def test_fork_bomb_is_contained():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    before = time.monotonic()
    r = run_program(bomb + GOOD, test=TEST, timeout=2.0, max_processes=16, harden=False)
    assert_blocked(r, 2.0)
    assert r.status in ("timeout", "killed")
    assert time.monotonic() - before < 5.0
    deadline = time.monotonic() + 3.0
    while sandbox_uid_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_uid_processes() == []
    # With the audit layer (the default) the fork is refused outright.
    r = run_program("import os\nwhile True:\n    os.fork()\n" + GOOD, test=TEST, **FAST)
    assert_blocked(r, FAST["timeout"])
    assert r.error == "PermissionError"


# ----------------------------------------------------------------------------- host and test process


@pytest.mark.parametrize("harden", [True, False])
def test_writes_outside_the_workdir_do_not_land(harden):
    tag = secrets.token_hex(6)
    targets = [f"/tmp/r1sbx-escape-{tag}", str(REPO / f"escape-{tag}"), f"/dev/shm/r1sbx-escape-{tag}"]
    if not NS and not harden:
        pytest.skip("without namespaces only the audit layer confines writes")
    prog = "".join(f"open({t!r}, 'w').write('pwned')\n" for t in targets)
    prog += f"open({str(REPO / 'README.md')!r}, 'a').write('pwned')\n" + GOOD
    r = run_program(prog, test=TEST, harden=harden, **FAST)
    assert_blocked(r, FAST["timeout"])
    # A checkout under /tmp is not even visible inside the sandbox (its /tmp is a private tmpfs).
    hidden = str(REPO).startswith("/tmp/") and not harden
    assert r.error in ("PermissionError", "OSError") or (hidden and r.error == "FileNotFoundError")
    for t in targets:
        assert not os.path.exists(t), t
    assert "pwned" not in (REPO / "README.md").read_text() if (REPO / "README.md").exists() else True


@pytest.mark.parametrize("harden", [True, False])
def test_parent_environment_is_invisible(monkeypatch, harden):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("R1_SANDBOX_SECRET", secret)
    prog = (
        "import os, glob\nfound = os.environ.get('R1_SANDBOX_SECRET', '')\n"
        "for path in glob.glob('/proc/*/environ'):\n    try:\n"
        "        found += open(path, 'rb').read().decode('latin1')\n"
        "    except OSError:\n        pass\nprint(found[-200:])\nassert " + repr(secret) + " in found\n"
    )  # fmt: skip
    r = run_program(prog, test="assert True", harden=harden, **FAST)
    assert_blocked(r, FAST["timeout"])
    assert secret not in r.stdout and secret not in r.stderr


@pytest.mark.parametrize("harden", [True, False] if NS else [True])
def test_network_is_unreachable(harden):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.1)
    port = server.getsockname()[1]
    got, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:  # timeout: poll the stop flag
                continue
            got.append(conn.recv(100))
            conn.close()

    t = threading.Thread(target=accept)
    t.start()
    prog = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'exfil')\n"
    try:
        r = run_program(prog + GOOD, test=TEST, harden=harden, **FAST)
        time.sleep(0.3)  # a connection that did get through would be accepted by now
        from_sandbox = list(got)
        with socket.create_connection(("127.0.0.1", port), timeout=1) as c:  # the listener does work
            c.sendall(b"host")
        deadline = time.monotonic() + 2.0
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        t.join()
        server.close()
    assert_blocked(r, FAST["timeout"])
    assert from_sandbox == [] and got == [b"host"]


KILLS = ["os.kill(os.getppid(), 9)", "os.killpg(0, 9)", "os.kill(-1, 9)", "os.kill({me}, 9)",
         "os.kill({bystander}, 9)", "os.killpg({pgid}, 9)"]  # fmt: skip


@pytest.mark.parametrize("harden", [True, False] if NS else [True])
def test_killing_the_parent_fails_harmlessly(harden):
    bystander = subprocess.Popen(["sleep", "30"])  # a root process outside the sandbox
    try:
        kills = [k.format(me=os.getpid(), bystander=bystander.pid, pgid=os.getpgid(0)) for k in KILLS]
        if harden:  # each attempt on its own: the audit layer refuses it, the run fails
            for k in kills:
                r = run_program(f"import os\n{k}\n" + GOOD, test=TEST, **FAST)
                assert_blocked(r, FAST["timeout"])
                assert r.error == "PermissionError", (k, r.error)
        else:  # OS layer only: every attempt runs; none may reach outside the PID namespace
            prog = "import os\n" + "".join(f"try:\n    {k}\nexcept OSError:\n    pass\n" for k in kills)
            r = run_program(prog + WRONG, test=TEST, **FAST)
            assert_blocked(r, FAST["timeout"])
        assert bystander.poll() is None  # still alive, and so are we
        assert run_program(GOOD, test=TEST, **FAST).passed  # and the sandbox still works
    finally:
        bystander.kill()
        bystander.wait()


# -------------------------------------------------------------------------------- faking a pass


@pytest.mark.parametrize(
    "cheat",
    [
        "import sys\nsys.exit(0)\n",
        "import os\nos._exit(0)\n",
        "raise SystemExit(0)\n",
        "import os, sys\nsys.stdout.flush()\nos.kill(os.getpid(), 9)\n",
    ],
)
def test_exiting_before_the_tests(cheat):
    r = run_program(WRONG + cheat, test=TEST, **FAST)
    assert_blocked(r, FAST["timeout"])
    r = run_program(WRONG + cheat, test=HE_TEST, entry_point="add", partial=True, **FAST)
    assert_blocked(r, FAST["timeout"])
    assert r.tests_passed == 0


def test_exiting_inside_the_candidate():
    prog = "import os\ndef add(a, b):\n    os._exit(0)\n"
    assert_blocked(run_program(prog, test=HE_TEST, entry_point="add", **FAST), FAST["timeout"])
    prog = "def add(a, b):\n    raise SystemExit(0)\n"
    assert_blocked(run_program(prog, test=HE_TEST, entry_point="add", **FAST), FAST["timeout"])


ABS_TEST = "assert abs(add(2, 3) - 5) < 1e-9\n"
ABS_HE = "def check(candidate):\n    assert abs(candidate(2, 3) - 5) < 1e-9\n"


@pytest.mark.parametrize(
    "cheat, test",
    [
        # assert statements do not look AssertionError up in builtins
        ("import builtins\nbuiltins.AssertionError = type('Nope', (Exception,), {})\n", TEST),
        # the test's `check` is defined after the program
        ("def check(candidate):\n    pass\n", HE_TEST),
        # a module-level __builtins__ would be inherited by code run in the program's namespace
        ("import builtins\n__builtins__ = dict(vars(builtins), abs=lambda x: 0)\n", ABS_TEST),
        ("import builtins\n__builtins__ = dict(vars(builtins), abs=lambda x: 0)\n", ABS_HE),
        # patched builtins: the tests get a private pristine copy
        ("import builtins\nbuiltins.abs = lambda x: 0\n", ABS_TEST),
        ("import builtins\nbuiltins.abs = lambda x: 0\n", ABS_HE),
        # a program global shadowing a builtin
        ("def abs(x):\n    return 0\n", ABS_TEST),
        # module internals that test-side calls look up at call time are restored before the tests
        (
            "import re\nclass P:\n    def fullmatch(self, s):\n        return True\n"
            "re._compile = lambda *a, **k: P()\n",
            "import re\nassert re.fullmatch('5', str(add(2, 3)))\n",
        ),
        # patched stdlib modules: the tests import private copies
        ("import math\nmath.isclose = lambda *a, **k: True\n", "import math\nassert math.isclose(add(2, 3), 5)\n"),
        (
            "import math\nmath.isclose = lambda *a, **k: True\n",
            "import math\ndef check(candidate):\n    assert math.isclose(candidate(2, 3), 5)\n",
        ),
    ],
)
def test_monkey_patching_does_not_fake_a_pass(cheat, test):
    entry = "add" if "def check" in test else None
    for partial in (False, True):
        r = run_program(WRONG + cheat, test=test, entry_point=entry, partial=partial, **FAST)
        assert_blocked(r, FAST["timeout"])
        assert r.tests_passed == 0
    assert run_program(GOOD + cheat, test=test, entry_point=entry, **FAST).passed  # the test is sound


def test_candidate_patching_a_module_for_later_asserts():
    # Right on the first call, then it patches math.isclose for the remaining asserts of check().
    prog = (
        "import math\ncalls = []\ndef add(a, b):\n    calls.append(1)\n    if len(calls) == 1:\n"
        "        math.isclose = lambda *a, **k: True\n        return a + b\n    return -7\n"
    )  # fmt: skip
    for imp in ("import math\n", "from math import isclose\nimport math\n"):
        he = imp + "def check(candidate):\n    assert math.isclose(candidate(2, 3), 5)\n"
        he += (
            "    assert math.isclose(candidate(1, 1), 2)\n    assert isclose(candidate(4, 4), 8)\n"
            if "from" in imp
            else ""
        )
        he += "    assert math.isclose(candidate(1, 1), 2)\n" if "from" not in imp else ""
        assert_blocked(run_program(prog, test=he, entry_point="add", **FAST), FAST["timeout"])
        assert run_program(GOOD, test=he, entry_point="add", **FAST).passed


def test_program_threads_may_not_outlive_the_program():
    prog = (
        "import threading, time\ndef loop():\n    while True:\n        time.sleep(0.01)\n"
        "threading.Thread(target=loop, daemon=True).start()\n"
    )  # fmt: skip
    r = run_program(prog + GOOD, test=TEST, **FAST)
    assert_blocked(r, FAST["timeout"])
    assert r.error == "RuntimeError"
    joined = "import threading\nt = threading.Thread(target=print, args=('hi',))\nt.start()\nt.join()\n"
    assert run_program(joined + GOOD, test=TEST, **FAST).passed  # threads that finished are fine


def test_prelude_helpers_cannot_be_redefined():
    prelude = "def helper(x):\n    return 2 * x\n"
    cheat = prelude + "def helper(x):\n    return 0\ndef f(x):\n    return 0\n"
    test = "def check(candidate):\n    assert candidate(3) == helper(3)\n"
    assert run_program(cheat, test=test, entry_point="f", **FAST).passed  # works without a prelude...
    r = run_program(cheat, test=test, entry_point="f", prelude=prelude, **FAST)
    assert_blocked(r, FAST["timeout"])  # ...not with one
    good = prelude + "def f(x):\n    return helper(x)\n"
    assert run_program(good, test=test, entry_point="f", prelude=prelude, **FAST).passed


def test_always_equal_result_is_rejected():
    prog = (
        "class Eq(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "    def __sub__(self, other):\n        return 0\n"
        "def add(a, b):\n    return [Eq(0)]\n"
    )  # fmt: skip
    he = "def check(candidate):\n    assert candidate(2, 3) == [5]\n"
    r = run_program(prog, test=he, entry_point="add", **FAST)
    assert_blocked(r, FAST["timeout"])
    assert r.error == "TypeError"


def test_tracing_cannot_skip_asserts():
    prog = (
        "import sys\ndef tracer(frame, event, arg):\n"
        "    if frame.f_code.co_filename == '<test>' and event == 'line':\n"
        "        frame.f_lineno = frame.f_lineno + 1\n    return tracer\n"
        "sys.settrace(tracer)\n" + WRONG
    )  # fmt: skip
    assert_blocked(run_program(prog, test=TEST, **FAST), FAST["timeout"])


def test_printing_fake_markers():
    marker = "{h} ok 1 1 -\\n"
    prog = (
        "import os, secrets\nfor _ in range(50):\n"
        f"    line = '{marker}'.format(h=secrets.token_hex(16)).encode()\n"
        "    for fd in range(1, 20):\n        try:\n            os.write(fd, line)\n        except OSError:\n"
        "            pass\nprint('PASSED')\nos._exit(0)\n"
    )  # fmt: skip
    r = run_program(WRONG + prog, test=TEST, **FAST)
    assert_blocked(r, FAST["timeout"])
    assert r.status == "no_report"


@pytest.mark.parametrize(
    "hunt",
    [
        # scan every object for the nonce
        "import gc\ncands = [v for o in gc.get_objects()\n"
        "         for v in (o.values() if isinstance(o, dict) else o if isinstance(o, (list, tuple)) else ())\n"
        "         if isinstance(v, str) and len(v) == 32]\n",
        # walk our own stack: the nonce lives on the main thread, not here
        "import sys\ncands = []\nf = sys._getframe()\nwhile f is not None:\n"
        "    cands += [v for v in list(f.f_locals.values()) + list(f.f_globals.values())\n"
        "              if isinstance(v, str) and len(v) == 32]\n    f = f.f_back\n",
        # other threads' frames
        "import sys\ncands = [v for fr in sys._current_frames().values() for v in fr.f_locals.values()\n"
        "         if isinstance(v, str) and len(v) == 32]\n",
        # the job arrived on stdin
        "import sys\ncands = [sys.stdin.read()[10:42]]\n",
    ],
)
def test_hunting_for_the_nonce(hunt):
    forge = (
        "import os\nfor c in cands:\n    for fd in range(3, 12):\n        try:\n"
        "            os.write(fd, (c + ' ok 1 1 -\\n').encode())\n        except OSError:\n            pass\n"
        "os._exit(0)\n"
    )  # fmt: skip
    r = run_program(WRONG + hunt + forge, test=TEST, **FAST)
    assert_blocked(r, FAST["timeout"])


def test_harness_closures_use_no_globals():
    """After sealing, harness code must not look anything up in patchable module/builtin namespaces."""
    sealed = {"worker", "hook", "guard", "check_plain", "restore", "resolve", "inside_workdir", "deny",
              "describe", "private_import", "test_builtins"}  # fmt: skip
    nested = [c for c in sb._child_run.__code__.co_consts if getattr(c, "co_name", None) in sealed]
    assert {c.co_name for c in nested} == sealed
    for code in nested:
        for sub in [code] + [c for c in code.co_consts if hasattr(c, "co_code")]:
            globs = [i.argval for i in dis.get_instructions(sub) if i.opname == "LOAD_GLOBAL"]
            assert globs == [], (sub.co_name, globs)


# ---------------------------------------------------------------------------------------- batching


def test_batch_is_parallel_bounded_and_ordered():
    jobs = [SandboxJob(f"import time\ntime.sleep(0.6)\nx = {i}\n", f"assert x == {i}") for i in range(4)]
    jobs.append(SandboxJob("x = 0", "assert x == 1"))
    t0 = time.monotonic()
    res = run_programs(jobs, max_workers=2, config=SandboxConfig(timeout=5.0))
    took = time.monotonic() - t0
    assert [r.passed for r in res] == [True, True, True, True, False]
    assert 1.2 <= took < 4.0  # 4 sleepers on 2 workers: at least two rounds, not four


@pytest.mark.parametrize("code", [0, 1, 121, 122, 137])
def test_exit_codes_cannot_pose_as_sandbox_errors(code):
    # "error" (the sandbox is broken) makes CodeReward raise, so a program must not be able to fake it.
    r = run_program(f"import os\nos._exit({code})\n" + GOOD, test=TEST, **FAST)
    assert not r.passed and r.status in ("no_report", "killed"), (r.status, r.error)


def test_setup_failure_is_an_error():
    r = run_program(GOOD, test=TEST, **dict(FAST, memory_mb=1))  # no interpreter starts in 1 MiB
    assert r.status == "error" and not r.passed


def test_harness_survives_garbage():
    assert run_program("def f(:\n", test=TEST, **FAST).error == "SyntaxError"
    assert run_program("\x00", test=TEST, **FAST).status == "failed"
    assert run_program(GOOD, test="assert (", **FAST).error == "TestSyntaxError"
    # A real crash (C-stack overflow -> SIGSEGV) of the harness process itself.
    crash = "import sys\nsys.setrecursionlimit(10 ** 7)\nx = []\nfor _ in range(10 ** 6):\n    x = [x]\nrepr(x)\n"
    r = run_program(crash, test="assert True", **FAST)
    assert not r.passed and r.status == "killed", (r.status, r.error, r.stderr[-300:])


@pytest.mark.skipif(not os.access("/usr/bin/python3", os.X_OK), reason="needs a world-readable python")
def test_process_isolation_fallback():
    cfg = dict(FAST, isolation="process", python="/usr/bin/python3")
    ok = run_program(GOOD, test=TEST, **cfg)
    assert ok.passed and ok.isolation == "process", ok.stderr
    tag = secrets.token_hex(6)
    r = run_program(f"open('/tmp/r1sbx-escape-{tag}', 'w')\n" + GOOD, test=TEST, **cfg)
    assert_blocked(r, FAST["timeout"])
    assert not os.path.exists(f"/tmp/r1sbx-escape-{tag}")
    r = run_program("import socket\nsocket.socket()\n" + GOOD, test=TEST, **cfg)
    assert_blocked(r, FAST["timeout"])
    assert sys.executable  # the test process is still here
    assert signal.getsignal(signal.SIGINT) is not None
