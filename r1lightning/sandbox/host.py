"""The host side: start the judge and the candidate, each in its own sandbox, and read the verdict.

Per run: a socket pair joins the judge (fd 3) and the candidate (fd 3); a pipe carries the verdict
from the judge (fd 4) to us; the job and the program arrive on the processes' stdin; stdout/stderr
come back through capped pipes. Each process is ``python -I -S isolation.py <role>`` in a session of
its own; at the end both sessions and the candidate's cgroup are killed, whatever the verdict.

Isolation modes (``SandboxConfig.isolation``): ``namespace`` (root: namespaces + a uid per role),
``userns`` (unprivileged: the same namespaces inside a user namespace), ``weak`` (opt-in only:
separate processes and rlimits, nothing else). ``auto`` picks the first of the first two that a
probe run shows working, and refuses (``SandboxUnavailable``) when neither does.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SandboxConfig", "SandboxJob", "SandboxResult", "SandboxUnavailable", "run_program", "run_programs",
           "sandbox_capabilities"]  # fmt: skip

ISOLATION_SCRIPT = str(Path(__file__).with_name("isolation.py"))
READY = b"r1sbx: ready\n"  # written by isolation.py to stderr right before the role starts
SETUP_FAILED = 121
MODES = ("auto", "namespace", "userns", "weak")
_UID_BASE, _UID_SPAN = 1_700_000_000, 100_000_000  # far from any real account
_SYSTEM_LIBS = ("/lib", "/lib64", "/lib32", "/usr/lib", "/usr/lib64", "/usr/lib32", "/etc/ld.so.cache")
_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()


class SandboxUnavailable(RuntimeError):
    """No isolation mode works here and the weak mode was not asked for."""


@dataclass(frozen=True)
class SandboxConfig:
    """Limits of one run. ``timeout``: wall clock for the whole run (each call to the candidate gets
    at most ``call_timeout``, default ``timeout``); ``cpu_time`` defaults to ``timeout``;
    ``memory_mb``/``max_processes`` bound the candidate's sandbox as a whole (one cgroup v2 per run
    where the host has one to give, else rlimits and a single process); ``cgroup``: "auto", "off",
    or a cgroup v2 directory with the memory and pids controllers enabled for its children."""

    timeout: float = 10.0
    cpu_time: float | None = None
    call_timeout: float | None = None
    memory_mb: int = 1024
    max_processes: int = 32
    file_size_mb: int = 16
    disk_mb: int = 64
    max_open_files: int = 256
    max_output_bytes: int = 64 * 1024
    max_message_mb: int = 64
    isolation: str = "auto"
    cgroup: str = "auto"
    python: str | None = None  # interpreter for both processes; default: this one's base interpreter


@dataclass(frozen=True)
class SandboxJob:
    """``test``: Python source (``mode="function"``) or JSON ``{"inputs": [...], "outputs": [...]}``
    (``mode="stdio"``). ``prelude``: trusted source (e.g. a HumanEval prompt) run in the judge; its
    names, except ``entry_point``, are what the tests see."""

    source: str
    test: str | None = None
    entry_point: str | None = None
    partial: bool = False
    prelude: str | None = None
    mode: str = "function"


@dataclass
class SandboxResult:
    """``status``: passed | failed (the judge ran the tests; ``error`` names the first failure) |
    timeout (no verdict in time, or a call to the candidate timed out) | killed (the candidate died
    from a signal, e.g. the CPU limit) | no_verdict (both sandboxes started, the judge died without a
    verdict) | error (a sandbox failed before any untrusted code ran: the machine's problem, not the
    program's)."""

    passed: bool
    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration: float
    tests_passed: int = 0
    tests_total: int = 0
    error: str = ""
    message: str = ""
    output_truncated: bool = False
    isolation: str = ""
    judge_stderr: str = ""


# ------------------------------------------------------------------------------------- capabilities


def _interpreter(cfg: SandboxConfig) -> tuple[str, list[str]]:
    """The interpreter to run and what of the filesystem it needs (bind-mounted read-only)."""
    exe = os.path.realpath(cfg.python or getattr(sys, "_base_executable", None) or sys.executable)
    prefix = os.path.dirname(os.path.dirname(exe))
    binds = [exe] + [os.path.join(prefix, d) for d in ("lib", "lib64")] + list(_SYSTEM_LIBS)
    seen: list[str] = []
    for path in sorted({b for b in binds if os.path.lexists(b)}, key=len):
        if not any(path.startswith(s.rstrip("/") + "/") for s in seen if not os.path.islink(s)):
            seen.append(path)
    return exe, seen


def _cgroup_root(setting: str) -> str | None:
    """A cgroup v2 directory whose children get the memory and pids controllers, or None."""
    if setting == "off" or not sys.platform.startswith("linux"):
        return None
    try:
        if setting != "auto":
            base = setting
        else:
            mounts = [ln.split() for ln in Path("/proc/self/mountinfo").read_text().splitlines()]
            points = [m[4] for m in mounts if "cgroup2" in m[m.index("-") + 1 :][:1]]
            own = [ln[3:] for ln in Path("/proc/self/cgroup").read_text().splitlines() if ln.startswith("0::")]
            if not points or not own:
                return None
            base = points[0] + own[0].rstrip("/")
            if own[0] == "/" and {"memory", "pids"} <= set(Path(base, "cgroup.controllers").read_text().split()):
                enabled = set(Path(base, "cgroup.subtree_control").read_text().split())
                if not {"memory", "pids"} <= enabled:  # the namespace's root cgroup: we may enable them
                    Path(base, "cgroup.subtree_control").write_text("+memory +pids")
        if not {"memory", "pids"} <= set(Path(base, "cgroup.subtree_control").read_text().split()):
            return None
        probe = Path(base, f"r1sbx-probe-{secrets.token_hex(4)}")
        probe.mkdir()
        probe.rmdir()
        return base
    except (OSError, ValueError, IndexError):
        return None


@functools.lru_cache(maxsize=8)
def sandbox_capabilities(python: str | None = None, cgroup: str = "auto") -> dict:
    """What this machine allows, from real probe runs; ``isolation`` is what "auto" resolves to."""
    root = os.geteuid() == 0
    cfg = SandboxConfig(timeout=30.0, python=python, cgroup=cgroup)
    found, errors = None, {}
    for mode in ("namespace", "userns"):
        if mode == "namespace" and not root:
            errors[mode] = "needs root"
            continue
        probe = _run(SandboxJob("x = 1", "assert x == 1"), cfg, mode, cgroup_root=None)
        if probe.passed:
            found = mode
            break
        errors[mode] = (probe.error or probe.judge_stderr or probe.stderr).strip()[-300:]
    return {"root": root, "isolation": found, "errors": errors, "cgroup": _cgroup_root(cgroup)}


def _mode(cfg: SandboxConfig) -> str:
    if cfg.isolation not in MODES:
        raise ValueError(f"unknown sandbox isolation {cfg.isolation!r}; expected one of {MODES}")
    caps = sandbox_capabilities(cfg.python, cfg.cgroup)
    if cfg.isolation == "weak":
        warnings.warn("code sandbox in weak mode: no mount, network or PID namespace"
                      + ("" if caps["root"] else ", no per-run uid and no process limit")
                      + "; untrusted code can read the host's files and reach its network", RuntimeWarning, stacklevel=3)  # fmt: skip
        return "weak"
    if cfg.isolation == "auto":
        if caps["isolation"] is None:
            why = "; ".join(f"{k}: {v}" for k, v in caps["errors"].items())
            raise SandboxUnavailable(f"refusing to run untrusted code: no namespace isolation here ({why}); "
                                     "run as root or allow user namespaces, or opt into isolation='weak'")  # fmt: skip
        return caps["isolation"]
    return cfg.isolation


# ---------------------------------------------------------------------------------------- one run


def _alloc_uids(n: int) -> list[int]:
    with _uid_lock:
        out: list[int] = []
        while len(out) < n:
            uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                out.append(uid)
        return out


def _release_uids(uids: list[int]) -> None:
    with _uid_lock:
        _uids_in_use.difference_update(uids)


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("r1sbx", os.MFD_CLOEXEC) if hasattr(os, "memfd_create") else None
    if fd is None:
        with tempfile.TemporaryFile() as tmp:
            fd = os.dup(tmp.fileno())
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _new_cgroup(root: str, cfg: SandboxConfig) -> str:
    path = os.path.join(root, f"r1sbx-{secrets.token_hex(8)}")
    os.mkdir(path)
    limits = {"memory.max": str(cfg.memory_mb << 20), "memory.swap.max": "0", "pids.max": str(cfg.max_processes),
              "cpu.max": "100000 100000"}  # fmt: skip
    for name, value in limits.items():
        if os.path.exists(os.path.join(path, name)):
            Path(path, name).write_text(value)
    return path


def _remove_cgroup(path: str) -> None:
    for _ in range(200):
        try:
            if os.path.exists(os.path.join(path, "cgroup.kill")):
                Path(path, "cgroup.kill").write_text("1")
            else:
                for pid in Path(path, "cgroup.procs").read_text().split():
                    os.kill(int(pid), signal.SIGKILL)
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.005)


def _spawn(exe: str, role: str, cfg: dict, stdin: int, fds: tuple) -> subprocess.Popen:
    cfg = dict(cfg, fds=list(fds))
    return subprocess.Popen([exe, "-I", "-S", ISOLATION_SCRIPT, role, json.dumps(cfg)], stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=fds, cwd="/",
                            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True)  # fmt: skip


def _collect(procs: list, verdict_fd: int, deadline: float, cap: int):
    """Read every pipe (keeping ``cap`` bytes of each output) until the verdict pipe closes or the
    deadline passes; then only what is already written."""
    fds = {verdict_fd: bytearray()}
    limits = {verdict_fd: 1 << 16}
    for p in procs:
        fds[p.stdout.fileno()], fds[p.stderr.fileno()] = bytearray(), bytearray()
        limits[p.stdout.fileno()], limits[p.stderr.fileno()] = cap, cap + len(READY)
    truncated, timed_out, drain_until = False, False, None
    with selectors.DefaultSelector() as sel:
        for fd in fds:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            now = time.monotonic()
            if drain_until is None and now >= deadline:
                timed_out, drain_until = True, now + 0.05
            ready = sel.select(timeout=0 if drain_until else min(deadline - now, 0.1))
            if drain_until is not None and (not ready or now >= drain_until):
                break
            for key, _ in ready:
                data = os.read(key.fd, 1 << 16)
                if not data:
                    sel.unregister(key.fd)
                    if key.fd == verdict_fd:
                        drain_until = time.monotonic() + 0.05
                    continue
                buf = fds[key.fd]
                room = limits[key.fd] - len(buf)
                if len(data) > room:
                    truncated = True
                    data = data[: max(room, 0)]
                buf += data
    return [bytes(fds[fd]) for fd in fds], timed_out, truncated


def _run(job: SandboxJob, cfg: SandboxConfig, mode: str, cgroup_root: str | None) -> SandboxResult:
    t0 = time.monotonic()
    root = os.geteuid() == 0
    exe, binds = _interpreter(cfg)
    uids = _alloc_uids(2) if root else []
    cgroup = None
    if cgroup_root and mode != "weak":
        try:
            cgroup = _new_cgroup(cgroup_root, cfg)
        except OSError:  # e.g. the delegation went away: this run falls back to rlimits, one process
            cgroup = None
    workdir = tempfile.mkdtemp(prefix="r1sbx-") if mode == "weak" else None
    if workdir and uids:
        os.chmod(workdir, 0o777)
    cpu = max(1, int(-(-(cfg.cpu_time if cfg.cpu_time is not None else cfg.timeout) // 1)))
    base = dict(namespaces=mode != "weak", userns=mode == "userns", binds=binds, workdir=workdir,
                disk_mb=cfg.disk_mb, file_size_mb=cfg.file_size_mb, max_open_files=cfg.max_open_files,
                cpu_time=cpu, cgroup=None, mode=job.mode, entry_point=job.entry_point or None)  # fmt: skip
    nproc = cfg.max_processes if cgroup else 1  # without a cgroup, one process: RLIMIT_AS is the total
    if mode == "weak" and not root:
        nproc = resource.RLIM_INFINITY
    cand_cfg = dict(base, uid=uids[0] if uids else None, memory_mb=cfg.memory_mb, max_processes=nproc, cgroup=cgroup)
    judge_cfg = dict(base, uid=uids[1] if uids else None, memory_mb=max(cfg.memory_mb, 512),
                     max_processes=4 if uids else nproc, cpu_time=cpu + 2)  # fmt: skip
    job_data = json.dumps(dict(test=job.test or "", entry_point=job.entry_point or None, prelude=job.prelude,
                               partial=job.partial, mode=job.mode, timeout=cfg.timeout,
                               call_timeout=cfg.call_timeout or cfg.timeout,
                               max_message_bytes=cfg.max_message_mb << 20)).encode()  # fmt: skip
    chan_j, chan_c = socket.socketpair()
    verdict_r, verdict_w = os.pipe()
    stdin_j, stdin_c = _memfd(job_data), _memfd(job.source.encode("utf-8", "replace"))
    procs: list[subprocess.Popen] = []
    try:
        try:
            procs.append(_spawn(exe, "judge", judge_cfg, stdin_j, (chan_j.fileno(), verdict_w)))
            procs.append(_spawn(exe, "candidate", cand_cfg, stdin_c, (chan_c.fileno(),)))
        finally:
            for fd in (stdin_j, stdin_c, verdict_w):
                os.close(fd)
            chan_j.close()
            chan_c.close()
        (raw, j_out, j_err, c_out, c_err), timed_out, truncated = _collect(
            procs, verdict_r, t0 + cfg.timeout + 1.0, cfg.max_output_bytes)
        cand_rc = procs[1].poll()
        if cand_rc is None and b"CandidateExited" in raw:  # its waiter is about to report how it ended
            try:
                cand_rc = procs[1].wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
    except OSError as e:
        return SandboxResult(False, "error", None, "", str(e), time.monotonic() - t0, error=f"could not start: {e}",
                             isolation=mode)  # fmt: skip
    finally:
        os.close(verdict_r)
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the waiter; the PID namespace dies with it
            except OSError:
                pass
        if cgroup:
            _remove_cgroup(cgroup)
        for p in procs:
            p.stdout.close()
            p.stderr.close()
            p.wait()
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        _release_uids(uids)
    return _result(raw, j_err, c_out, c_err, cand_rc, timed_out, truncated, t0, mode)


def _result(raw, j_err, c_out, c_err, cand_rc, timed_out, truncated, t0, mode) -> SandboxResult:
    c_ready, j_ready = c_err.startswith(READY), j_err.startswith(READY)
    r = SandboxResult(passed=False, status="failed", returncode=cand_rc,
                      stdout=c_out.decode("utf-8", "replace"),
                      stderr=c_err[len(READY) if c_ready else 0 :].decode("utf-8", "replace"),
                      duration=time.monotonic() - t0, output_truncated=truncated, isolation=mode,
                      judge_stderr=j_err.decode("utf-8", "replace"))  # fmt: skip
    v = None
    try:
        v = json.loads(raw) if j_ready else None
        involved = v is None or v["error"] in ("CandidateExited", "Timeout", "ProtocolError")
    except (ValueError, KeyError, TypeError):
        involved = True
    if not j_ready or (not c_ready and involved):  # a sandbox failed before any untrusted code ran
        r.status = "error"
        r.error = (r.judge_stderr if not j_ready else r.stderr).strip()[-500:] or "sandbox setup failed"
        return r
    try:
        ok, passed, total = v["ok"] is True, int(v["passed"]), int(v["total"])
        r.error, r.message = str(v["error"]), str(v["message"])
    except (ValueError, KeyError, TypeError):  # not "error": a hostile answer may have sunk the judge
        r.status = "timeout" if timed_out else "no_verdict"
        r.error = "wall-clock timeout" if timed_out else ("the judge gave no verdict: " + r.judge_stderr[-300:])
        return r
    r.tests_passed, r.tests_total, r.passed = passed, total, ok
    if ok:
        r.status = "passed"
    elif r.error == "Timeout":
        r.status = "timeout"
    elif r.error == "CandidateExited" and cand_rc is not None and cand_rc > 128:
        r.status, r.error = "killed", f"signal {cand_rc - 128}"
    return r


# ---------------------------------------------------------------------------------------- the API


def run_program(source: str, *, test: str | None = None, entry_point: str | None = None, partial: bool = False,
                prelude: str | None = None, mode: str = "function", **config) -> SandboxResult:  # fmt: skip
    """Run ``test`` against ``source`` (see ``SandboxJob``, ``SandboxConfig``)."""
    return run_programs([SandboxJob(source, test, entry_point, partial, prelude, mode)], max_workers=1,
                        config=SandboxConfig(**config))[0]  # fmt: skip


def run_programs(jobs: Iterable[SandboxJob], *, max_workers: int | None = None,
                 config: SandboxConfig | None = None) -> list[SandboxResult]:  # fmt: skip
    """Run many jobs, at most ``max_workers`` (default: CPU count) at a time; results in order."""
    jobs = list(jobs)
    cfg = config or SandboxConfig()
    mode = _mode(cfg)
    cg = sandbox_capabilities(cfg.python, cfg.cgroup)["cgroup"]
    workers = max(1, min(max_workers or os.cpu_count() or 1, len(jobs) or 1))
    if workers == 1:
        return [_run(j, cfg, mode, cg) for j in jobs]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="r1sbx") as pool:
        return list(pool.map(lambda j: _run(j, cfg, mode, cg), jobs))
