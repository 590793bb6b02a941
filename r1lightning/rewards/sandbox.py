"""Run untrusted, model-written Python in a separate, locked-down process.

Two layers:

* **OS layer** (protects the host): every run is a fresh ``python -I -S`` interpreter, never a fork
  of the caller. As root, where unshare(2) is permitted ("namespace" isolation), it gets new mount,
  network, PID, IPC and UTS namespaces; the whole filesystem is remounted read-only and nosuid,
  ``/proc`` is unmounted, ``/tmp``, ``/var/tmp`` and ``/dev/shm`` are one size-capped private tmpfs,
  and the program runs as a per-run unprivileged uid (so ``RLIMIT_NPROC`` is enforced — the kernel
  ignores it for uid 0) with ``no_new_privs``. Resource limits: wall clock (parent side), CPU time,
  address space, file size, open files, processes. Environment scrubbed, output capped, the process
  group killed on timeout and the PID namespace dies with its init process.
* **Harness layer** (protects the reward): the child harness only reports a pass by writing a per-run
  random nonce, received on stdin and dropped from the file table before any untrusted code runs, to
  a dedicated result pipe once every test ran. Untrusted code runs in a worker thread, so its stack
  never contains the frame that holds the nonce; an audit hook blocks the cheap introspection and
  escape routes (gc object walks, ``sys._current_frames``, tracing, ctypes, sub-interpreters,
  ``/proc``, sockets, signals, process creation, writes outside the workdir). The tests get private
  builtins and private copies of imported stdlib modules, never see program globals that shadow
  builtins, take helpers from a trusted prelude when one is given, and run only while no program
  thread is alive; patched stdlib module globals are restored before every test unit; a HumanEval
  candidate's return values must be plain builtin data.

Threat model and known limits are documented in ``README`` (section "Sandboxed code execution").
Everything above the ``end of child section`` marker is also executed, as source text, by the child
interpreter, so that part may only use the standard library.
"""

from __future__ import annotations

import os
import sys

# Exit codes of the child stages; anything else comes from the program itself.
_EXIT_SETUP_FAILED = 121
_EXIT_HARNESS_FAILED = 122

# Unit kinds of the harness plan.
_EXEC, _BIND, _CALL = 0, 1, 2

# Imported before the snapshot so that patches to them are undone between test units. threading
# must come from the main thread: imported first in the worker it would re-arm that thread's
# sentinel lock and orphan the harness's.
_PREIMPORT = (
    "threading", "math", "cmath", "re", "string", "collections", "itertools", "functools", "heapq", "bisect",
    "operator", "random", "typing", "hashlib", "copy", "fractions", "decimal", "statistics",
)  # fmt: skip

_BLOCKED_IMPORTS = frozenset({
    "ctypes", "_ctypes", "_testcapi", "_testinternalcapi", "_testbuffer", "_testmultiphase",
    "_testclinic", "_testimportmultiple", "_xxsubinterpreters", "_xxtestfuzz", "_posixsubprocess",
})  # fmt: skip

_BLOCKED_EVENTS = frozenset({
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames",
    "sys._current_exceptions", "sys.settrace", "sys.setprofile", "sys.addaudithook",
    "os.kill", "os.killpg", "signal.pthread_kill", "signal.pidfd_send_signal", "os.system",
})  # fmt: skip

_BLOCKED_PREFIXES = (
    "ctypes.", "socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
    "pty.", "cpython.PyInterpreterState", "sys.monitoring", "_thread.start_joinable",
)  # fmt: skip

# Events that modify the filesystem: index of the path argument(s) that must stay in the workdir.
_WRITE_EVENTS = {
    "os.mkdir": (0,), "os.rename": (0, 1), "os.remove": (0,), "os.rmdir": (0,), "os.symlink": (1,),
    "os.link": (1,), "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,), "os.utime": (0,),
    "os.setxattr": (0,), "os.removexattr": (0,), "os.chflags": (0,), "os.lchflags": (0,),
}  # fmt: skip


def _child_entry() -> None:
    import json

    stage, cfg = sys.argv[1], json.loads(sys.argv[2])
    if stage == "setup":
        _child_setup(cfg, sys.argv[3])
    elif stage == "run":
        _child_run(cfg)
    os._exit(_EXIT_HARNESS_FAILED)


# --------------------------------------------------------------------------- setup stage (trusted)


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _checked(ret: int, what: str) -> int:
    if ret < 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _mount(src, target, fstype, flags, data=None) -> None:
    ctypes, libc = _libc()
    src, target, fstype, data = (None if v is None else v.encode() for v in (src, target, fstype, data))
    ret = libc.mount(src, target, fstype, ctypes.c_ulong(flags), data)
    _checked(ret, f"mount {target!r}")


def _mount_setattr_ro(path: str) -> None:
    """Recursively make ``path`` read-only and nosuid (mount_setattr(2), Linux >= 5.12)."""
    ctypes, libc = _libc()

    class MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]  # fmt: skip

    attr = MountAttr(0x1 | 0x2, 0, 0, 0)  # MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID
    ret = libc.syscall(ctypes.c_long(442), ctypes.c_int(-100), path.encode(),
                       ctypes.c_uint(0x8000), ctypes.byref(attr), ctypes.c_size_t(32))  # fmt: skip
    if ret == 0:
        return
    if ctypes.get_errno() != 38:  # anything but ENOSYS is a real failure
        _checked(ret, f"mount_setattr {path}")
    # Old kernel: remount every mount below ``path`` one by one.
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4] for line in f]
    for t in targets:
        if t == path or t.startswith(path.rstrip("/") + "/"):
            try:
                _mount(None, t, None, 4096 | 32 | 1 | 2)  # MS_BIND|MS_REMOUNT|MS_RDONLY|MS_NOSUID
            except OSError:
                pass


def _setup_mounts(cfg: dict) -> str:
    ctypes, libc = _libc()
    _mount(None, "/", None, 16384 | (1 << 18))  # MS_REC | MS_PRIVATE: nothing leaks back out
    prefix, hide = cfg["prefix"], cfg["hide"]
    tree_fd = -1
    if hide:
        # The interpreter lives below a directory the sandbox uid may not enter (e.g. /root):
        # clone its tree now, cover the directory with an empty tmpfs, re-attach the clone.
        tree_fd = _checked(libc.syscall(ctypes.c_long(428), ctypes.c_int(-100), prefix.encode(),
                                        ctypes.c_uint(1 | 0o2000000 | 0x8000)), "open_tree")  # fmt: skip
    _mount_setattr_ro("/")
    try:
        _checked(libc.umount2(b"/proc", 2), "umount /proc")  # MNT_DETACH; no /proc/*/mem, environ
    except OSError:
        _mount("tmpfs", "/proc", "tmpfs", 2 | 4 | 8, "size=4k,mode=555")
    opts = f"size={cfg['disk_mb']}m,nr_inodes={cfg['inodes']},mode=1777"
    _mount("tmpfs", "/tmp", "tmpfs", 2 | 4, opts)  # MS_NOSUID | MS_NODEV
    for extra in ("/var/tmp", "/dev/shm"):
        if os.path.isdir(extra) and not os.path.islink(extra):
            _mount("/tmp", extra, None, 4096)  # MS_BIND: one shared, capped scratch space
    if hide:
        _mount("tmpfs", hide, "tmpfs", 2 | 4, "size=1m,mode=755")
        os.makedirs(prefix, mode=0o755, exist_ok=True)
        _checked(libc.syscall(ctypes.c_long(429), ctypes.c_int(tree_fd), b"", ctypes.c_int(-100),
                              prefix.encode(), ctypes.c_uint(4)), "move_mount")  # fmt: skip
        os.close(tree_fd)
        _mount_setattr_ro(hide)
    work = "/tmp/work"
    os.mkdir(work, 0o700)
    if cfg["uid"] is not None:
        os.chown(work, cfg["uid"], cfg["uid"])
    return work


def _count_own_processes() -> int:
    uid, n = os.getuid(), 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            n += int(line.split()[1]) == uid
                            break
            except (OSError, ValueError):
                pass
    return n


def _child_setup(cfg: dict, source: str) -> None:
    """Runs as the (possibly root) child: namespaces, limits, privilege drop, then exec the harness."""
    import resource

    try:
        fd = cfg["result_fd"]
        if fd != 3:
            os.dup2(fd, 3)
            os.close(fd)
        if cfg["namespaces"]:
            ctypes, libc = _libc()
            # mount | UTS | IPC | PID | network; our first child becomes init of the new PID namespace.
            _checked(libc.unshare(0x00020000 | 0x04000000 | 0x08000000 | 0x20000000 | 0x40000000), "unshare")
            pid = os.fork()
            if pid:
                # Waiter (root, holds nothing secret): mirror the child's fate in our exit code.
                os.close(0)
                os.close(3)
                status = os.waitpid(pid, 0)[1]
                code = os.waitstatus_to_exitcode(status)
                os._exit(code if code >= 0 else 128 - code)
            libc.prctl(1, ctypes.c_ulong(9), 0, 0, 0)  # PR_SET_PDEATHSIG: die with the waiter
            workdir = _setup_mounts(cfg)
        else:
            workdir = cfg["workdir"]
        uid = cfg["uid"]
        nproc = cfg["max_processes"]
        if uid is None:  # unprivileged caller: NPROC counts all our processes, so add headroom
            nproc += _count_own_processes()
        limits = [
            (resource.RLIMIT_CPU, cfg["cpu_time"]),  # soft == hard: SIGKILL, even for a PID-ns init
            (resource.RLIMIT_AS, cfg["memory_mb"] << 20),
            (resource.RLIMIT_FSIZE, cfg["file_size_mb"] << 20),
            (resource.RLIMIT_NOFILE, cfg["max_open_files"]),
            (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_NPROC, nproc),
        ]
        for res, value in limits:
            resource.setrlimit(res, (value, value))
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        ctypes, libc = _libc()
        if cfg["namespaces"]:
            # Changing credentials cleared the death signal: set it again, so the whole PID
            # namespace dies when the parent kills the waiter.
            libc.prctl(1, ctypes.c_ulong(9), 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
        _checked(libc.prctl(38, ctypes.c_ulong(1), 0, 0, 0), "no_new_privs")
        os.chdir(workdir)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        run_cfg = dict(result_fd=3, harden=cfg["harden"])
        import json

        exe = cfg["exe"]
        os.execve(exe, [exe, "-I", "-S", "-c", source, "run", json.dumps(run_cfg)], env)
    except BaseException as e:  # noqa: BLE001 - report anything, the parent maps it to "error"
        os.write(2, f"r1sbx: sandbox setup failed: {e!r}\n".encode())
        os._exit(_EXIT_SETUP_FAILED)


# ----------------------------------------------------------------------- run stage (the harness)


def _plan_units(test: str, entry_point: str | None, partial: bool) -> list:
    """Split the (trusted) test source into units: (kind, payload, counts_as_test)."""
    import ast

    tree = ast.parse(test or "", "<test>")

    def comp(body):
        return compile(ast.Module(body=body, type_ignores=[]), "<test>", "exec")

    def has_assert(node):
        # `assert True, "debug note"` lines (common in HumanEval) are not tests.
        return any(isinstance(n, ast.Assert) and not isinstance(n.test, ast.Constant) for n in ast.walk(node))

    if not partial:
        units = [(_EXEC, comp(tree.body), entry_point is None)]
        return units + [(_CALL, None, True)] if entry_point else units
    check = None
    if entry_point:
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "check" and len(node.args.args) == 1:
                check = node
    if check is None:
        units = [(_EXEC, comp([s]), has_assert(s)) for s in tree.body]
        return units + [(_CALL, None, True)] if entry_point else units
    try:
        # HumanEval style: the body of check(candidate) runs statement by statement, with the
        # (guarded) candidate bound as a global of the test namespace.
        body = [(_EXEC, comp([s]), has_assert(s)) for s in check.body]
    except SyntaxError:  # e.g. a `return` inside check: fall back to one unit
        return [(_EXEC, comp(tree.body), False), (_CALL, None, True)]
    rest = [s for s in tree.body if s is not check]
    return [(_EXEC, comp(rest), False), (_BIND, check.args.args[0].arg, False)] + body


def _drop_ctypes() -> None:
    for name in list(sys.modules):
        if name in ("ctypes", "_ctypes") or name.startswith("ctypes."):
            del sys.modules[name]


def _child_run(cfg: dict) -> None:  # noqa: C901 - one closure on purpose, see below
    """The harness. After sealing, the nested functions use only closure variables captured here:
    untrusted code can patch builtins and module attributes, but not the harness's own references."""
    import _thread
    import builtins
    import gc
    import json

    result_fd = cfg["result_fd"]
    chunks = []
    while True:
        b = os.read(0, 1 << 16)
        if not b:
            break
        chunks.append(b)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)  # the job (and its nonce) is gone from the fd table before user code runs
    os.close(null)
    job = json.loads(b"".join(chunks))
    del chunks
    nonce = job.pop("nonce")
    harden = cfg["harden"]
    program, entry, partial, prelude = job["program"], job["entry_point"], job["partial"], job["prelude"]
    st = os.fstat(result_fd)
    result_id = (st.st_dev, st.st_ino)
    try:
        units = _plan_units(job["test"], entry, partial)
    except SyntaxError:
        os.write(result_fd, f"{nonce} started\n{nonce} fail 0 1 TestSyntaxError\n".encode())
        os._exit(0)
    del job
    n_counting = sum(1 for u in units if u[2])

    ctypes, libc = _libc()
    libc.prctl(4, ctypes.c_ulong(0), 0, 0, 0)  # PR_SET_DUMPABLE=0: no ptrace/process_vm_readv
    del ctypes, libc
    if harden:
        _drop_ctypes()
    for name in _PREIMPORT:
        try:
            __import__(name)
        except ImportError:
            pass

    # Snapshot of the pristine runtime, restored before every unit.
    bdict = builtins.__dict__
    bsnap = dict(bdict)
    msnaps = [(m.__dict__, dict(m.__dict__)) for k, m in list(sys.modules.items())
              if k not in ("sys", "builtins", "__main__") and type(m) is type(sys)]  # fmt: skip
    modsnap = dict(sys.modules)
    modules = sys.modules
    builtins_mod = builtins
    # Test code imports get private copies of the pre-imported modules: a candidate that patches
    # math.isclose on its first call cannot fool the asserts after it.
    copies = {}
    for k, m in modsnap.items():
        if type(m) is type(sys) and k not in ("sys", "builtins", "__main__"):
            c = type(sys)(k)
            c.__dict__.update(m.__dict__)
            copies[id(m)] = c
    real_import = builtins.__import__

    # Captured references (see docstring).
    _type, _id, _str, _int, _bool, _dict, _len = type, id, str, int, bool, dict, len
    _float, _complex, _bytes, _list, _tuple, _set, _frozenset = (
        float, complex, bytes, list, tuple, set, frozenset)  # fmt: skip
    _NoneType = type(None)
    _exec, _compile = exec, compile
    BE, _PermissionError, _TypeError, _RuntimeError = BaseException, PermissionError, TypeError, RuntimeError
    type_name = type.__dict__["__name__"].__get__
    str_str = str.__str__
    get_ident, set_sentinel, thread_count = _thread.get_ident, _thread._set_sentinel, _thread._count
    start_thread, allocate_lock = _thread.start_new_thread, _thread.allocate_lock
    gc_disable = gc.disable
    fstat, os_write, os_exit, readlink, getcwd = os.fstat, os.write, os._exit, os.readlink, os.getcwd
    out, err_stream = sys.stdout, sys.stderr
    main_ident = get_ident()
    workdir = os.path.realpath(os.getcwd())
    blocked_events, blocked_prefixes, blocked_imports = _BLOCKED_EVENTS, _BLOCKED_PREFIXES, _BLOCKED_IMPORTS
    write_events = _WRITE_EVENTS
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    EXEC, BIND = _EXEC, _BIND

    def check_plain(value):
        # Objects with a custom __eq__ (always-equal tricks) must not reach the test's comparisons.
        stack, seen, n = [value], _set(), 0
        while stack:
            x = stack.pop()
            t = _type(x)
            n += 1
            if n > 2_000_000:
                raise _TypeError("candidate result too large to verify")
            if t is _int or t is _float or t is _str or t is _bool or t is _NoneType or t is _bytes \
                    or t is _complex:  # fmt: skip
                continue
            if t is _list or t is _tuple or t is _set or t is _frozenset or t is _dict:
                i = _id(x)
                if i in seen:
                    continue
                seen.add(i)
                if t is _dict:
                    stack.extend(x.keys())
                    stack.extend(x.values())
                else:
                    stack.extend(x)
                continue
            raise _TypeError("candidate returned a value that is not plain builtin data")

    def guard(fn):
        def candidate(*args, **kwargs):
            r = fn(*args, **kwargs)
            check_plain(r)
            return r

        return candidate

    def restore():
        bdict.clear()
        bdict.update(bsnap)
        for d, s in msnaps:
            d.clear()
            d.update(s)
        modules.update(modsnap)
        gc_disable()  # the program may have re-enabled it to time its finalizers

    def private_import(name, globals=None, locals=None, fromlist=(), level=0):
        m = real_import(name, globals, locals, fromlist, level)
        c = copies.get(_id(m))
        return m if c is None else c

    def test_builtins():
        b = _dict(bsnap)
        b["__import__"] = private_import
        return b

    def describe(e, where):
        try:
            name = str_str(type_name(_type(e)))[:80]
            name = "".join([c if c.isalnum() or c in "_." else "_" for c in name]) or "Exception"
        except BE:
            name = "Exception"
        try:
            msg = str_str(_str(e))[:300]
        except BE:
            msg = "?"
        try:
            os_write(2, f"[r1sbx {where}] {name}: {msg}\n".encode("utf-8", "replace"))
        except BE:
            pass
        return name

    res, box = [], []
    ready, go = allocate_lock(), allocate_lock()
    ready.acquire()
    go.acquire()

    def worker():
        box.append(set_sentinel())  # released by the interpreter when this thread is really gone
        box[0].acquire()
        ready.release()
        go.acquire()  # wait until the main thread took the sentinel out of reach
        ok, passed, err = False, 0, ""
        try:
            trusted = {"__name__": "__sandbox_prelude__", "__builtins__": test_builtins()}
            if prelude:
                try:  # trusted source (e.g. the HumanEval prompt), run before any untrusted code
                    _exec(_compile(prelude, "<prelude>", "exec"), trusted)
                except BE as e:
                    describe(e, "prelude")
            ns = {"__name__": "__sandbox__", "__builtins__": builtins_mod}
            try:
                _exec(_compile(program, "<program>", "exec"), ns)
                ok = True
            except BE as e:
                err = describe(e, "program")
            if ok:
                # Program globals must not shadow builtins for the tests (`def abs(x): return 0`),
                # and helpers the tests rely on come from the trusted prelude, not the program.
                g = {k: v for k, v in ns.items() if k not in bsnap or k == entry}
                for k, v in trusted.items():
                    if k != entry and not k.startswith("__"):
                        g[k] = v
                aborted = False
                for kind, payload, counts in units:
                    if aborted:
                        break
                    try:
                        restore()
                        if thread_count() > 1:  # only this worker: nothing may patch concurrently
                            aborted = True
                            raise _RuntimeError("threads started by the program are still running")
                        g["__builtins__"] = test_builtins()  # private to the test code
                        if kind == EXEC:
                            _exec(payload, g)
                        elif kind == BIND:
                            g[payload] = guard(ns[entry])
                        else:
                            g["check"](guard(ns[entry]))
                        if counts:
                            passed += 1
                    except BE as e:
                        ok = False
                        name = describe(e, "test")
                        err = err or name
                        if not counts:
                            aborted = True  # a setup statement failed: the rest cannot run
        except BE as e:
            ok = False
            err = err or describe(e, "harness")
        finally:
            for s in (out, err_stream):
                try:
                    s.flush()
                except BE:
                    pass
            res.extend((ok, passed, err))

    def resolve(path):
        # Minimal realpath on captured primitives (posixpath's is patchable Python code).
        if _type(path) is _bytes:
            path = path.decode("utf-8", "surrogateescape")
        if _type(path) is not _str:
            return None
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        todo, parts, hops = path.split("/")[::-1], [], 0
        while todo:
            p = todo.pop()
            if p == "" or p == ".":
                continue
            if p == "..":
                if parts:
                    parts.pop()
                continue
            cur = "/" + "/".join(parts + [p])
            try:
                target = readlink(cur)
            except BE:
                parts.append(p)
                continue
            hops += 1
            if hops > 40:
                return None
            if target.startswith("/"):
                parts = []
            todo.extend(target.split("/")[::-1])
        return "/" + "/".join(parts)

    def inside_workdir(path):
        r = resolve(path)
        return r is not None and (r == workdir or r.startswith(workdir + "/") or r == "/dev/null")

    def deny(event):
        raise _PermissionError(f"r1sbx sandbox: {event} is not allowed")

    def hook(event, args):
        if event in blocked_events or event.startswith(blocked_prefixes):
            deny(event)
        if event == "open":
            path = args[0]
            if _type(path) is _int:
                return
            r = resolve(path)
            if r is None or r == "/proc" or r.startswith("/proc/"):
                deny(event)
            mode, flags = args[1], args[2]
            writes = (_type(flags) is _int and flags & write_flags) or (
                _type(mode) is _str and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)
            )
            if writes and not inside_workdir(path):
                deny(event)
        elif event == "import":
            name = args[0]
            if _type(name) is not _str or name in blocked_imports or name.startswith("_test"):
                deny(event)
        elif event == "sys._getframe" or event == "object.__getattr__":
            if get_ident() == main_ident:  # frames of the main thread hold the nonce
                deny(event)
        elif event == "object.__setattr__":
            if _type(args[1]) is not _str or args[1] == "__code__":
                deny(event)
        elif event in write_events:
            for i in write_events[event]:
                if i < _len(args) and _type(args[i]) is not _int and not inside_workdir(args[i]):
                    deny(event)

    gc_disable()  # no collections (and so no user finalizers) on the main thread
    if harden:
        sys.addaudithook(hook)
    del hook
    # From here on failures are the program's doing; without this line the parent knows the
    # sandbox itself failed (exit codes cannot tell: the program may choose any).
    os_write(result_fd, f"{nonce} started\n".encode())
    start_thread(worker, ())
    ready.acquire()
    sentinel = box.pop()
    go.release()
    sentinel.acquire()  # the worker thread has terminated
    gc_disable()

    if _len(res) != 3:
        os_exit(0)  # tampered with: no report
    r_ok, r_passed, r_err = res[0], res[1], res[2]  # copies: a leftover thread may still touch `res`
    if not ((r_ok is True or r_ok is False) and _type(r_passed) is _int and _type(r_err) is _str
            and 0 <= r_passed <= n_counting and _len(r_err) <= 80):  # fmt: skip
        os_exit(0)
    if r_err and not r_err.replace("_", "a").replace(".", "a").isalnum():
        r_err = "Exception"
    ok = r_ok is True and r_passed == n_counting
    st = fstat(result_fd)
    if (st.st_dev, st.st_ino) != result_id:  # fd 3 was swapped for something else: no report
        os_exit(0)
    os_write(result_fd, f"{nonce} {'ok' if ok else 'fail'} {r_passed} {n_counting} {r_err or '-'}\n".encode())
    os_exit(0)


# ---- end of child section ----

import functools  # noqa: E402 - the child executes only the section above
import json  # noqa: E402
import secrets  # noqa: E402
import selectors  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterable  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

__all__ = [
    "SandboxConfig",
    "SandboxJob",
    "SandboxResult",
    "run_program",
    "run_programs",
    "sandbox_capabilities",
]

_CHILD_MARKER = "# ---- end of child section ----"
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
_UID_BASE, _UID_SPAN = 1_700_000_000, 100_000_000  # far from any real account
_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation of one run. ``cpu_time`` defaults to ``timeout``."""

    timeout: float = 10.0
    cpu_time: float | None = None
    memory_mb: int = 1024
    max_processes: int = 32
    file_size_mb: int = 16
    disk_mb: int = 64
    max_open_files: int = 256
    max_output_bytes: int = 64 * 1024
    isolation: str = "auto"  # "auto" | "namespace" | "process"
    harden: bool = True  # install the audit-hook layer in the child
    python: str | None = None  # interpreter for the child; default: this one


@dataclass(frozen=True)
class SandboxJob:
    """``prelude``: trusted source (e.g. a HumanEval prompt) run on its own; the names it defines,
    except ``entry_point``, are what the tests see (so a program cannot redefine a helper they use)."""

    source: str
    test: str | None = None
    entry_point: str | None = None
    partial: bool = False
    prelude: str | None = None


@dataclass
class SandboxResult:
    """``status``: passed | failed (tests ran, some failed) | timeout | killed (by a signal, e.g. the
    CPU limit) | no_report (exited without the harness verdict: early exit, tampering) | error (the
    sandbox itself failed before any untrusted code ran)."""

    passed: bool
    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration: float
    tests_passed: int = 0
    tests_total: int = 0
    error: str = ""
    output_truncated: bool = False
    isolation: str = ""


@functools.lru_cache(maxsize=1)
def _child_source() -> str:
    text = Path(__file__).read_text()
    head, sep, _ = text.partition(_CHILD_MARKER)
    if not sep:
        raise RuntimeError("sandbox.py lost its child-section marker")
    return head + "\n_child_entry()\n"


@functools.lru_cache(maxsize=1)
def sandbox_capabilities() -> dict:
    """What this machine allows, probed once with a real trivial run in namespace isolation.
    ``isolation`` is what "auto" resolves to."""
    root = os.geteuid() == 0
    namespaces, why = False, "needs root"
    if root and sys.platform.startswith("linux"):
        probe = _run(SandboxJob("x = 1", "assert x == 1"), SandboxConfig(timeout=30.0), "namespace")
        namespaces, why = probe.passed, probe.error
    return {
        "root": root,
        "namespaces": namespaces,
        "namespace_error": "" if namespaces else why,
        "setuid": root,
        "isolation": "namespace" if namespaces else "process",
    }


def _hidden_ancestor(path: str) -> str | None:
    """Topmost directory on ``path`` that 'others' may not traverse (None: all reachable)."""
    cur = "/"
    for part in Path(path).parts[1:]:
        cur = os.path.join(cur, part)
        try:
            if not os.stat(cur).st_mode & 0o001:
                return cur
        except OSError:
            return cur
    return None


def _alloc_uid() -> int:
    with _uid_lock:
        while True:
            uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid


def _release_uid(uid: int | None) -> None:
    if uid is not None:
        with _uid_lock:
            _uids_in_use.discard(uid)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process whose real uid is ``uid`` (unique per run) until none is left."""
    for _ in range(50):
        found = False
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                real, state = int(fields["Uid"].split()[0]), fields["State"].split()[0]
            except (OSError, ValueError, KeyError):
                continue
            if real == uid and state != "Z":  # zombies are harmless and vanish with their reaper
                found = True
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
        if not found:
            return
        time.sleep(0.01)


def _error(msg: str, t0: float, isolation: str) -> SandboxResult:
    return SandboxResult(False, "error", None, "", msg, time.monotonic() - t0, error=msg,
                         isolation=isolation)  # fmt: skip


def _exited(proc: subprocess.Popen) -> bool:
    # WNOWAIT: do not reap yet, so the pid (our process-group id) cannot be reused before killpg.
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _collect(proc: subprocess.Popen, result_fd: int, deadline: float, cap: int):
    """Read stdout/stderr/result until EOF or the deadline, keeping at most ``cap`` bytes each."""
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(), result_fd: bytearray()}
    caps = {proc.stdout.fileno(): cap, proc.stderr.fileno(): cap, result_fd: 4096}
    truncated = timed_out = False
    exited_at = None
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if exited_at is None and _exited(proc):
                exited_at = now
            if exited_at is not None and now - exited_at > 0.5:
                break  # something that outlived the child still holds a pipe
            for key, _ in sel.select(timeout=min(deadline - now, 0.1)):
                data = os.read(key.fd, 1 << 16)
                if not data:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                room = caps[key.fd] - len(buf)
                if len(data) > room:
                    truncated = truncated or key.fd != result_fd
                    data = data[: max(room, 0)]
                buf += data  # the rest is drained and dropped: memory stays bounded
    out, err, res = (bytes(bufs[fd]) for fd in (proc.stdout.fileno(), proc.stderr.fileno(), result_fd))
    return out, err, res, timed_out, truncated


def _parse_report(raw: bytes, nonce: str):
    """(started, verdict): did the harness reach untrusted code, and its (ok, passed, total, error)."""
    lines = [ln.split() for ln in raw.decode("ascii", "replace").splitlines()]
    mine = [ln for ln in lines if ln and ln[0] == nonce]
    started = [ln for ln in mine if ln == [nonce, "started"]]
    final = [ln for ln in mine if ln != [nonce, "started"]]
    if len(started) != 1 or len(final) > 1:
        return bool(started), None  # more than the harness writes: tampered
    if not final or len(final[0]) != 5 or final[0][1] not in ("ok", "fail"):
        return True, None
    try:
        passed, total = int(final[0][2]), int(final[0][3])
    except ValueError:
        return True, None
    if not 0 <= passed <= total:
        return True, None
    return True, (final[0][1] == "ok", passed, total, "" if final[0][4] == "-" else final[0][4])


def _isolation(cfg: SandboxConfig) -> str:
    if cfg.isolation not in ("auto", "namespace", "process"):
        raise ValueError(f"unknown isolation {cfg.isolation!r}")
    return sandbox_capabilities()["isolation"] if cfg.isolation == "auto" else cfg.isolation


def _job_fd(payload: bytes) -> int:
    """A readable fd holding the job; anonymous memory where possible, never a named file."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("r1sbx-job", os.MFD_CLOEXEC)
    else:
        tmp = tempfile.TemporaryFile()
        fd = os.dup(tmp.fileno())
        tmp.close()
    os.write(fd, payload)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _run(job: SandboxJob, cfg: SandboxConfig, isolation: str) -> SandboxResult:
    t0 = time.monotonic()
    root = os.geteuid() == 0
    if isolation == "namespace" and not root:
        return _error("namespace isolation needs root", t0, isolation)
    exe = os.path.realpath(cfg.python or sys.executable)
    prefix = os.path.dirname(os.path.dirname(exe))
    uid = _alloc_uid() if root else None
    hide = _hidden_ancestor(prefix) if uid is not None else None
    if uid is not None and hide is not None and (isolation == "process" or hide == prefix):
        _release_uid(uid)
        return _error(f"interpreter {exe} is not reachable by an unprivileged uid ({hide} is closed); "
                      "use namespace isolation or a world-readable python", t0, isolation)  # fmt: skip
    cpu = cfg.cpu_time if cfg.cpu_time is not None else cfg.timeout
    nonce = secrets.token_hex(16)
    payload = json.dumps(dict(nonce=nonce, program=job.source, test=job.test or "", prelude=job.prelude,
                              entry_point=job.entry_point, partial=job.partial)).encode()  # fmt: skip
    workdir = None
    if isolation == "process":
        workdir = tempfile.mkdtemp(prefix="r1sbx-")
        if uid is not None:
            os.chown(workdir, uid, uid)
    job_fd = _job_fd(payload)
    res_r, res_w = os.pipe()
    setup_cfg = dict(
        namespaces=isolation == "namespace", uid=uid, exe=exe, prefix=prefix, hide=hide,
        workdir=workdir, result_fd=res_w, harden=cfg.harden, cpu_time=max(1, int(-(-cpu // 1))),
        memory_mb=cfg.memory_mb, file_size_mb=cfg.file_size_mb, max_open_files=cfg.max_open_files,
        max_processes=cfg.max_processes, disk_mb=cfg.disk_mb, inodes=4096,
    )  # fmt: skip
    src = _child_source()
    cmd = [exe, "-I", "-S", "-c", src, "setup", json.dumps(setup_cfg), src]
    proc = None
    timed_out = False
    try:
        try:
            proc = subprocess.Popen(cmd, stdin=job_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    pass_fds=(res_w,), env=dict(_ENV), cwd=workdir or "/",
                                    start_new_session=True, close_fds=True)  # fmt: skip
        except OSError as e:
            return _error(f"could not start the sandbox: {e}", t0, isolation)
        finally:
            os.close(job_fd)
            os.close(res_w)
        out, err, raw, timed_out, truncated = _collect(proc, res_r, t0 + cfg.timeout, cfg.max_output_bytes)
    finally:
        os.close(res_r)
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the session: the waiter (-> PID ns) or the child
            except OSError:
                pass
            if uid is not None and (timed_out or isolation == "process"):
                _kill_uid(uid)
            for stream in (proc.stdout, proc.stderr):
                stream.close()
            proc.wait()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        _release_uid(uid)
    rc = proc.returncode
    started, report = _parse_report(raw, nonce)
    result = SandboxResult(
        passed=False, status="no_report", returncode=rc, stdout=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace"), duration=time.monotonic() - t0,
        output_truncated=truncated, isolation=isolation,
    )  # fmt: skip
    if timed_out:
        result.status, result.error = "timeout", "wall-clock timeout"
    elif not started:  # failed before any untrusted code ran
        result.status, result.error = "error", result.stderr.strip()[-500:] or f"exit code {rc}"
    elif rc is not None and (rc < 0 or (rc > 128 and report is None)):
        result.status, result.error = "killed", f"signal {-rc if rc < 0 else rc - 128}"
    elif report is not None and rc == 0:
        ok, result.tests_passed, result.tests_total, result.error = report
        result.passed = ok
        result.status = "passed" if ok else "failed"
    else:
        result.error = f"exit code {rc} without a valid harness report"
    return result


def run_program(
    source: str,
    *,
    test: str | None = None,
    entry_point: str | None = None,
    partial: bool = False,
    prelude: str | None = None,
    timeout: float = 10.0,
    cpu_time: float | None = None,
    memory_mb: int = 1024,
    **config,
) -> SandboxResult:
    """Run ``source`` then ``test`` (and ``check(<entry_point>)``) in a sandbox; see SandboxConfig."""
    cfg = SandboxConfig(timeout=timeout, cpu_time=cpu_time, memory_mb=memory_mb, **config)
    return _run(SandboxJob(source, test, entry_point, partial, prelude), cfg, _isolation(cfg))


def run_programs(
    jobs: Iterable[SandboxJob],
    *,
    max_workers: int | None = None,
    config: SandboxConfig | None = None,
) -> list[SandboxResult]:
    """Run many jobs, at most ``max_workers`` (default: CPU count) sandboxes at a time, in order."""
    jobs = list(jobs)
    cfg = config or SandboxConfig()
    isolation = _isolation(cfg)
    workers = max(1, min(max_workers or os.cpu_count() or 1, len(jobs) or 1))
    if workers == 1:
        return [_run(j, cfg, isolation) for j in jobs]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="r1sbx") as pool:
        return list(pool.map(lambda j: _run(j, cfg, isolation), jobs))
