"""Lock a fresh interpreter down, then run one role (``judge`` or ``candidate``) in it.

    python -I -S isolation.py <role> <config-json>

Run by the host (``host.py``) once per role and run, never imported. In order:

1. join the run's cgroup v2 (memory, pids, CPU for the sandbox as a whole), when the host made one;
2. new mount, network, PID, IPC and UTS namespaces (as root), or the same inside a new user
   namespace (an unprivileged caller); fork so that the role is init of its PID namespace (it and
   everything it starts die together) while this process waits and mirrors its exit code;
3. a new root: an empty read-only tmpfs holding only the interpreter, its standard library and the
   system library directories (read-only bind mounts), /dev/null, /dev/zero, /dev/urandom and a
   private, size-capped /tmp. No /proc, /sys, /run, home, project checkout or host sockets;
4. rlimits (CPU, address space, file size, open files, core, processes: 1 for the candidate without a
   cgroup, so the address-space limit is the limit of the whole sandbox), a per-run uid (as root),
   no capabilities (none left in the bounding set, and uid 0 gains none on exec), ``no_new_privs``,
   not dumpable, every other fd closed;
5. ``role.main(config)``. The role's module is imported before the filesystem goes away.

Any failure before the role starts exits with ``SETUP_FAILED`` and a message on stderr; the host
then reports the run as a sandbox error, never as a verdict.
"""

from __future__ import annotations

import json
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SETUP_FAILED = 121
READY = b"r1sbx: ready\n"  # the host checks for it: a run whose sandbox never got ready is an error

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 28, 38
SECBIT_NOROOT, SECBIT_NOROOT_LOCKED = 1, 2
_SYSCALLS = {"x86_64": {"pivot_root": 155, "capset": 126}, "aarch64": {"pivot_root": 41, "capset": 91}}
NEW_ROOT = "/tmp"  # any existing directory: the new root's tmpfs is mounted over it in our namespace
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _mount(src, target, fstype, flags, data=None) -> None:
    ctypes, libc = _libc()
    args = [None if v is None else v.encode() for v in (src, target, fstype)]
    _check(libc.mount(*args, ctypes.c_ulong(flags), None if data is None else data.encode()), f"mount {target}")


def _syscall(name: str, *args) -> int:
    ctypes, libc = _libc()
    number = _SYSCALLS.get(os.uname().machine, {}).get(name)
    if number is None:
        raise OSError(38, f"{name}: unknown syscall number on {os.uname().machine}")
    return _check(libc.syscall(ctypes.c_long(number), *args), name)


def _locked_flags(path: str) -> int:
    """Flags of the source mount that a user namespace may not clear on a bind remount."""
    f = os.statvfs(path).f_flag
    flags = MS_NOSUID | MS_NODEV | (MS_NOEXEC if f & 8 else 0)
    flags |= (MS_NOATIME if f & 1024 else 0) | (MS_NODIRATIME if f & 2048 else 0) | (MS_RELATIME if f & 4096 else 0)
    return flags


def _bind(src: str, root: str, writable_device: bool = False) -> None:
    dst = root + src
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "w").close()
    _mount(src, dst, None, MS_BIND)
    if not writable_device:
        _mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | _locked_flags(src))


def _new_root(cfg: dict) -> None:
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing propagates back to the host
    root = NEW_ROOT
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=1000,mode=755")
    for path in cfg["binds"]:
        if os.path.islink(path):  # e.g. /lib -> usr/lib on merged-/usr systems
            os.makedirs(os.path.dirname(root + path), exist_ok=True)
            os.symlink(os.readlink(path), root + path)
        elif os.path.exists(path):
            _bind(path, root)
    for dev in DEVICES:
        if os.path.exists(dev):
            _bind(dev, root, writable_device=True)
    os.mkdir(root + "/tmp")
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={cfg['disk_mb']}m,nr_inodes=4096,mode=1777")  # fmt: skip
    os.chdir(root)
    _syscall("pivot_root", b".", b".")  # the old root is stacked on top of the new one ...
    ctypes, libc = _libc()
    _check(libc.umount2(b".", MNT_DETACH), "umount old root")  # ... and detached
    os.chdir("/")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _enter_namespaces(cfg: dict) -> None:
    ctypes, libc = _libc()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    uid, gid = os.getuid(), os.getgid()
    if cfg["userns"]:
        _check(libc.unshare(CLONE_NEWUSER | flags), "unshare (user namespace)")
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    else:
        _check(libc.unshare(flags), "unshare")
    pid = os.fork()
    if pid:  # the waiter: holds nothing, mirrors the role's fate
        os.closerange(0, 1 << 16)
        status = os.waitpid(pid, 0)[1]
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(9), 0, 0, 0)  # die with the waiter (killed by the host)


def _limits(cfg: dict) -> None:
    for res, value in (
        (resource.RLIMIT_CPU, cfg["cpu_time"]),  # soft == hard: SIGKILL
        (resource.RLIMIT_AS, cfg["memory_mb"] << 20),
        (resource.RLIMIT_FSIZE, cfg["file_size_mb"] << 20),
        (resource.RLIMIT_NOFILE, cfg["max_open_files"]),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NPROC, cfg["max_processes"]),
    ):
        hard = resource.getrlimit(res)[1]
        if hard != resource.RLIM_INFINITY and (value == resource.RLIM_INFINITY or value > hard):
            value = hard  # an unprivileged process may not raise a hard limit
        resource.setrlimit(res, (value, value))


def _drop_privileges(cfg: dict) -> None:
    ctypes, libc = _libc()
    if cfg["namespaces"]:  # we hold CAP_SETPCAP here: empty the bounding set, and uid 0 gains nothing on exec
        for cap in range(64):
            libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0)  # EINVAL past the last capability
        _check(libc.prctl(PR_SET_SECUREBITS, ctypes.c_ulong(SECBIT_NOROOT | SECBIT_NOROOT_LOCKED), 0, 0, 0),
               "securebits")  # fmt: skip
    if cfg["uid"] is not None:  # root: a uid of its own for this run, so RLIMIT_NPROC counts only it
        os.setgroups([])
        os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(9), 0, 0, 0)  # cleared by the credential change
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    _syscall("capset", ctypes.byref(header), ctypes.byref((ctypes.c_uint32 * 6)()))  # no capabilities
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), 0, 0, 0), "no_new_privs")
    _check(libc.prctl(PR_SET_DUMPABLE, ctypes.c_ulong(0), 0, 0, 0), "dumpable")


def _place_fds(cfg: dict) -> None:
    """The role's fds at fixed numbers (3: channel, 4: verdict), everything else closed."""
    wanted = cfg["fds"]  # [channel] or [channel, verdict]
    temp = [os.dup(fd) for fd in wanted]
    for i, fd in enumerate(temp):
        os.dup2(fd, 3 + i)
    os.closerange(3 + len(temp), 1 << 16)


def main() -> None:
    role, cfg = sys.argv[1], json.loads(sys.argv[2])
    try:
        if role not in ("judge", "candidate"):
            raise ValueError(f"unknown role {role!r}")
        run = __import__(role).main  # while the project checkout is still visible
        if cfg["cgroup"]:
            with open(os.path.join(cfg["cgroup"], "cgroup.procs"), "w") as f:
                f.write("0")
        if cfg["namespaces"]:
            _enter_namespaces(cfg)
            _new_root(cfg)
        else:
            os.chdir(cfg["workdir"])
        _place_fds(cfg)
        _limits(cfg)
        _drop_privileges(cfg)
        os.environ.clear()
        scratch = "/tmp" if cfg["namespaces"] else cfg["workdir"]
        os.environ.update({"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": scratch, "TMPDIR": scratch})
    except BaseException as e:  # noqa: BLE001 - report anything, the host maps it to "error"
        os.write(2, f"r1sbx: sandbox setup failed: {e!r}\n".encode())
        os._exit(SETUP_FAILED)
    os.write(2, READY)  # setup done: from here on, what happens is the role's (or the program's) doing
    run(cfg)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
