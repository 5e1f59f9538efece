"""Run untrusted Python (a policy's code completion plus its tests) in a sandbox.

The boundary is built outside the Python interpreter, by the kernel, through bubblewrap (``bwrap``):

- the code runs as an unprivileged user: nobody (65534) in a user namespace when the trainer is
  an ordinary user; when the trainer is root, bwrap keeps only CAP_SETUID/CAP_SETGID and the
  guard (below) becomes nobody for good before any of the code runs;
- its own mount namespace: a read-only view of /usr, /lib*, /bin, a few /etc files (the dynamic
  loader's) and the Python installation (its prefixes, not the trainer's source tree or home);
  a private /proc and minimal /dev; the only writable place is a private, size-limited tmpfs
  holding /tmp and the working directory /tmp/work, gone when the run ends;
- new PID, network, IPC and UTS namespaces: no network, no other process visible or reachable;
- a seccomp filter (x86-64 and arm64) refusing new user namespaces (which would give the code
  capabilities inside them: kernel attack surface), ptrace, process_vm_readv/writev, keyrings,
  bpf, userfaultfd, perf_event_open and io_uring;
- ``--die-with-parent``, ``--new-session``, no capabilities, an empty environment (not even
  the trainer's, which ``/proc/1/environ`` would otherwise show) and no inherited file
  descriptors besides stdin/stdout/stderr and the two harness pipes;
- resource limits (``setrlimit``): CPU seconds, address space, file size, open files, the
  number of processes of the sandbox user; a wall-clock limit after which the whole process
  group is killed; bounded capture of stdout and stderr.

A Python audit hook is a second layer, inside the interpreter (so it does not bound a program that
gets past it): it refuses processes, signals to other processes, sockets, ``ctypes`` calls, tracing
and monitoring, ``gc`` introspection, new code objects, writing outside the working directory
(``open`` with any writing flag or mode, ``rename`` on both ends, ``dir_fd`` arguments, opening
directories outside) and reading or listing outside the working directory and the Python
installation. Everything the hook uses is bound when it is installed, so changing builtins, modules
or the guard's globals later does not change it.

Without bubblewrap (or where it cannot create namespaces, e.g. inside an unprivileged container)
:func:`run_python` raises :class:`SandboxUnavailableError` saying how to fix it, unless isolation
is explicitly not required (``SandboxLimits(require_isolation=False)`` or ``SEQRL_SANDBOX=weak``):
then only the audit hook, the resource limits and a fresh working directory apply, with a drop to
nobody when the trainer is root and the interpreter is world-readable. That is not a security
boundary: use it only for code you trust.

**Success is not the exit status.** Code can exit 0 without running its tests (``sys.exit(0)``,
``os._exit(0)``, an ``atexit`` or signal handler, ``SystemExit`` in a ``finally``). So the program
and its tests are compiled, each on its own (the program cannot make the tests part of a string or a
block), into one module that runs in a fresh ``__main__``; the guard reads a random nonce from a
pipe before the program starts, closes that pipe and keeps the nonce only on its own frame's value
stack, as an argument of the call that reports success, evaluated before the module runs. That call
happens only if the module returns normally, i.e. every statement of the tests ran without raising;
it writes the nonce to a second pipe, and :attr:`SandboxResult.completed` is whether exactly the
nonce came back. The program never sees the nonce: it is in no file, argument, environment variable,
global or local variable; Python code reaches a value stack only through ``gc.get_referents``
(refused, as is every ``gc.get_*``), and raw memory only through ``ctypes`` or ``/proc/self/mem``
(both refused). Skipping the tests needs a jump (``sys.settrace``, ``sys.monitoring``: refused) or
crafted bytecode (``code.__new__``, refused). Printing a marker, writing guesses to every file
descriptor or killing anything proves nothing.

What the verifier cannot detect: the tests run in the program's process, on the program's
objects, so a program that returns an object whose ``__eq__`` is always true passes
``assert f(x) == y``, and one that patches what the tests call (``math.isclose``, a helper the
tests import) changes what they check. Tests that must hold against that compare plain values
outside the sandbox (print ``repr(f(x))`` and compare in the trainer). A program that defeats
the audit hook (a CPython memory-safety bug, e.g. via ``marshal``-crafted code objects) could
read the nonce and forge a pass; it still cannot leave the sandbox.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import platform
import secrets
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass

_NOBODY = 65534
_CPU_EXIT = 128 + signal.SIGXCPU  # bwrap's exit status when the code dies of the CPU-time limit
_WORK = "/tmp/work"  # the working directory inside bubblewrap
_ETC = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "alternatives")
_TAG = "seqrl-sandbox"  # in every sandbox command line, so that `ps` can find them


class SandboxUnavailableError(RuntimeError):
    """The machine cannot isolate untrusted code (and isolation was required)."""


# The guard: sets the limits, drops to nobody when asked, compiles the program and its tests,
# installs the audit hook, then runs the module in a fresh __main__ and reports the nonce.
_GUARD = r"""
import ast, json, os, resource, sys, types
cfg = json.loads(sys.argv[1])
work = cfg["work"]
os.chdir(work)
resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu"], cfg["cpu"] + 1))  # then SIGKILL
for res, value in ((resource.RLIMIT_AS, cfg["memory"]), (resource.RLIMIT_FSIZE, cfg["fsize"]),
                   (resource.RLIMIT_NOFILE, cfg["nofile"]), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(res, (value, value))
if cfg["nproc"]:  # per user; under bubblewrap per user namespace
    resource.setrlimit(resource.RLIMIT_NPROC, (cfg["nproc"], cfg["nproc"]))
if cfg["drop"]:  # started as root: become nobody for good (setuid clears every capability)
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)


def load(split):
    # The program and the tests are parsed separately, so the program cannot swallow the tests.
    with open("main.py", "rb") as f:
        source = f.read()
    program, tests = ast.parse(source[:split], "main.py"), ast.parse(source[split:], "main.py")
    ast.increment_lineno(tests, source[:split].count(b"\n"))
    program.body += tests.body
    return compile(program, "main.py", "exec", dont_inherit=True)


try:
    code = load(cfg["split"])
except (SyntaxError, ValueError) as exc:
    import traceback
    sys.stderr.write("".join(traceback.format_exception_only(exc)))
    sys.exit(1)
try:  # imported before the hook (it dlopens at import) so that numpy & co. can import it;
    import ctypes  # every ctypes call after this point is refused by the hook
except ImportError:
    pass


def install_hook(work, readable):
    import stat as st
    deny = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
            "subprocess.", "pty.", "os.kill", "os.killpg", "signal.pthread_kill", "socket.",
            "ctypes.", "os.chdir", "os.chroot", "os.link", "os.symlink", "os.setxattr",
            "os.removexattr", "os.unshare", "os.setns", "resource.prlimit", "shutil.rmtree",
            "gc.get_", "sys.settrace", "sys.setprofile", "sys.monitoring.register_callback",
            "sys.addaudithook", "code.__new__")
    deny_imports = frozenset({"_posixsubprocess", "_socket", "socket", "_multiprocessing"})
    dir_fd_last = frozenset({"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
                             "os.utime"})
    cwd_fds = (None, -1, -100)  # no dir_fd (as the event reports it) or AT_FDCWD
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    devices = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
    work_ = (work + "/",)
    readable_ = tuple(r.rstrip("/") + "/" for r in readable)
    isinstance_, int_, str_, bytes_, fspath = isinstance, int, str, bytes, os.fspath
    stat_, isdir, oserror, error = os.stat, st.S_ISDIR, OSError, PermissionError
    plain, decode = str.__str__, bytes.decode

    def absolute(path):  # lexical: the code cannot create symlinks; the kernel resolves them
        if not isinstance_(path, (str_, bytes_)):
            path = fspath(path)
        if isinstance_(path, bytes_):  # unbound methods: a subclass cannot override them
            path = decode(path, "utf-8", "surrogateescape")
        path = plain(path)  # an exact str, whatever str subclass the code passed
        if not path.startswith("/"):
            path = work + "/" + path
        parts = []
        for part in path.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        return "/" + "/".join(parts) + "/"

    def is_dir(path):
        try:
            return isdir(stat_(path).st_mode)
        except oserror:
            return False

    def hook(event, args):
        if event.startswith(deny):
            raise error(f"sandbox: {event} is not allowed")
        if event == "import":
            if args[0].partition(".")[0] in deny_imports:
                raise error(f"sandbox: importing {args[0]} is not allowed")
        elif event == "open":
            path, mode, flags = args
            if isinstance_(path, int_):  # wraps a file descriptor the process already has
                return
            path = absolute(path)
            if path.startswith(work_) or path == "/dev/null/":
                return
            writing = flags & write_flags or (mode is not None and mode.strip("rbt"))
            if writing or (path.rstrip("/") not in devices and not path.startswith(readable_)):
                raise error(f"sandbox: opening {path[:-1]!r} is not allowed")
            if is_dir(path):  # no directory fd outside, so no dir_fd escape
                raise error(f"sandbox: opening the directory {path[:-1]!r} is not allowed")
        elif event in ("os.listdir", "os.scandir"):
            path = args[0]
            if path is not None and not isinstance_(path, int_):
                path = absolute(path)
                if not path.startswith(work_) and not path.startswith(readable_):
                    raise error(f"sandbox: listing {path[:-1]!r} is not allowed")
        elif event == "os.rename":
            src, dst, src_fd, dst_fd = args
            if (src_fd not in cwd_fds or dst_fd not in cwd_fds
                    or not absolute(src).startswith(work_) or not absolute(dst).startswith(work_)):
                raise error("sandbox: renaming outside the working directory is not allowed")
        elif event in dir_fd_last:
            target = args[0]
            if (isinstance_(target, int_) or args[-1] not in cwd_fds
                    or not absolute(target).startswith(work_)):
                raise error(f"sandbox: {event} outside the working directory is not allowed")
        elif event == "os.truncate":
            if not isinstance_(args[0], int_) and not absolute(args[0]).startswith(work_):
                raise error("sandbox: truncating outside the working directory is not allowed")
        elif event == "object.__setattr__" and args[1] == "__code__":
            raise error("sandbox: replacing __code__ is not allowed")

    sys.addaudithook(hook)


if cfg["hook"]:
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path}
    roots = {p for r in roots if r for p in (os.path.normpath(r), os.path.realpath(r))}
    install_hook(work, tuple(sorted(roots)))
main = types.ModuleType("__main__")
main.__file__ = work + "/main.py"
sys.modules["__main__"] = main
sys.argv[:] = ["main.py"]


def take(fd):
    nonce = os.read(fd, 64)
    os.close(fd)
    return nonce


def report(nonce, _):
    os.write(cfg["result_fd"], nonce)
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(0)


try:  # the nonce is taken before the module runs and exists only as report's first argument
    report(take(cfg["nonce_fd"]), exec(code, main.__dict__))
except SystemExit:
    raise
except BaseException as exc:  # print as Python would, without this frame
    sys.excepthook(type(exc), exc, exc.with_traceback(exc.__traceback__.tb_next).__traceback__)
    sys.exit(1)
"""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run; the defaults suit unit tests of a short function."""

    wall_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 512  # address space (RLIMIT_AS)
    max_processes: int = 64  # RLIMIT_NPROC of the sandbox user
    max_output_bytes: int = 64 * 1024  # per stream
    max_file_bytes: int = 4 * 1024 * 1024
    max_disk_bytes: int = 32 * 1024 * 1024  # the private /tmp, working directory included
    max_open_files: int = 64
    # False (or SEQRL_SANDBOX=weak): without bubblewrap, run with the in-process layers only.
    # Not a security boundary: for trusted code.
    require_isolation: bool = True


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # None when killed for time or output
    completed: bool  # the last statement (of the tests, if any) ran: the nonce came back
    stdout: str
    stderr: str
    timed_out: bool
    output_truncated: bool
    wall_s: float
    isolation: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Ran to the end of the tests and exited 0 within every limit."""
        return (
            self.completed
            and self.returncode == 0
            and not self.timed_out
            and not self.output_truncated
        )


def check_sandbox(limits: SandboxLimits | None = None) -> tuple[str, ...]:
    """The isolation layers :func:`run_python` will apply here; raises
    :class:`SandboxUnavailableError` when isolation is required and unavailable."""
    limits = limits or SandboxLimits()
    error = _bwrap_error()
    if error is None:
        return _bwrap_layers()
    if _require_isolation(limits):
        raise SandboxUnavailableError(_unavailable_message(error))
    _warn_weak(error)
    return _weak_layers(_weak_drop())


def run_python(
    code: str,
    *,
    tests: str = "",
    stdin: str = "",
    limits: SandboxLimits | None = None,
    audit_hook: bool = True,
) -> SandboxResult:
    """Run ``code`` and then ``tests`` (Python statements, in the same namespace) in the sandbox.

    ``result.completed`` says the tests' last statement ran; ``result.ok`` adds exit status 0
    within every limit. Never raises for anything the code does; raises
    :class:`SandboxUnavailableError` when the machine cannot isolate code (see
    :func:`check_sandbox`). ``audit_hook=False`` leaves out the in-process layer: only for testing
    the outer boundary alone.
    """
    limits = limits or SandboxLimits()
    check_sandbox(limits)
    return _run(code, tests, stdin, limits, audit_hook, isolated=_bwrap_error() is None)


# ---- policy --------------------------------------------------------------------------------


@functools.cache
def _bwrap_layers() -> tuple[str, ...]:
    no_userns = _seccomp_filter() is not None or (
        os.geteuid() != 0 and "--disable-userns" in _bwrap()[1]
    )
    return (
        "bubblewrap",
        "unprivileged-user",
        *(["no-user-namespaces"] if no_userns else []),
        "mount-namespace",
        "pid-namespace",
        "no-network",
        "process-limit",
        "rlimits",
        "workdir",
        "process-group",
        "audit-hook",
    )


def _weak_layers(drop: bool) -> tuple[str, ...]:
    extra = ("unprivileged-user", "process-limit") if drop else ()
    return ("rlimits", "workdir", "process-group", "audit-hook", *extra)


def _require_isolation(limits: SandboxLimits) -> bool:
    mode = os.environ.get("SEQRL_SANDBOX", "strict")
    if mode not in ("strict", "weak"):
        raise ValueError(f"SEQRL_SANDBOX must be 'strict' or 'weak', got {mode!r}")
    return limits.require_isolation and mode == "strict"


def _unavailable_message(reason: str) -> str:
    if os.geteuid() == 0:
        setup = (
            "root needs to create namespaces: run on a VM or a host, or in a container allowed "
            "to (e.g. docker --privileged, or --cap-add SYS_ADMIN with an unconfined seccomp "
            "profile); the code then runs as nobody (uid 65534)"
        )
    else:
        setup = (
            "allow unprivileged user namespaces (sysctl -w user.max_user_namespaces=15000; "
            "Debian before 11: sysctl -w kernel.unprivileged_userns_clone=1; Ubuntu 24.04+: "
            "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0), or run the trainer as "
            "root (the code then runs as nobody)"
        )
    return (
        f"cannot sandbox code rewards: {reason}.\n"
        "Fix: install bubblewrap (apt-get install bubblewrap, dnf install bubblewrap); "
        f"{setup}.\n"
        "Only for code you trust: SEQRL_SANDBOX=weak or SandboxLimits(require_isolation=False) "
        "run it without isolation (not a security boundary)."
    )


@functools.cache
def _warn_weak(reason: str) -> None:
    warnings.warn(
        f"code rewards run WITHOUT a sandbox boundary ({reason}): trusted code only",
        RuntimeWarning,
        stacklevel=3,
    )


def _weak_drop() -> bool:
    """Without bubblewrap, root can become nobody only when nobody can read the interpreter."""
    return os.geteuid() == 0 and _world_readable(sys.base_prefix)


@functools.cache
def _world_readable(path: str) -> bool:
    """Whether another user can reach ``path`` (every parent directory world-searchable)."""
    path = os.path.realpath(path)
    while True:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH or not mode & stat.S_IROTH:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


# ---- bubblewrap ----------------------------------------------------------------------------


@functools.cache
def _bwrap() -> tuple[str, str] | None:
    """The bwrap executable and its --help text (to know which options it has), or None."""
    exe = shutil.which("bwrap")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return exe, done.stdout + done.stderr


@functools.cache
def _bwrap_error() -> str | None:
    """Why bubblewrap cannot isolate code here, or None when it can (tried once per process)."""
    if _bwrap() is None:
        return "bubblewrap (bwrap) is not installed"
    probe = _run("pass", "", "", SandboxLimits(wall_s=20.0), True, isolated=True)
    if probe.ok:
        return None
    detail = (probe.stderr.strip() or f"exit status {probe.returncode}").splitlines()[-1]
    return f"bwrap could not start a sandbox ({detail})"


@functools.cache
def _python_roots() -> tuple[str, ...]:
    """The Python installation's directories (prefixes, the interpreter's), outside /usr."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths |= {os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))}
    paths = {p for path in paths for p in (os.path.normpath(path), os.path.realpath(path))}
    roots: list[str] = []
    for path in sorted(paths, key=len):
        if path != "/" and not any(path == r or path.startswith(r + "/") for r in ["/usr", *roots]):
            roots.append(path)
    return tuple(roots)


def _bwrap_command(
    main_fd: int, seccomp_fd: int | None, limits: SandboxLimits, env: dict[str, str]
) -> list[str]:
    exe, options = _bwrap()
    cmd = [exe, "--die-with-parent", "--new-session", "--clearenv"]
    for key, value in env.items():
        cmd += ["--setenv", key, value]
    if os.geteuid() == 0:  # no user namespace: the guard becomes nobody, then has no capability
        cmd += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"]
        cmd += ["--unshare-cgroup-try", "--cap-drop", "ALL"]
        cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:  # nobody in a user namespace of its own, without capabilities
        cmd += ["--unshare-all", "--unshare-user", "--uid", str(_NOBODY), "--gid", str(_NOBODY)]
        cmd += ["--cap-drop", "ALL"]
        if "--disable-userns" in options:
            cmd.append("--disable-userns")
    cmd += ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            cmd += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            cmd += ["--ro-bind", path, path]
    for name in _ETC:
        cmd += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
    cmd += ["--proc", "/proc", "--dev", "/dev"]
    if "--size" in options:
        cmd += ["--size", str(limits.max_disk_bytes)]
    cmd += ["--perms", "1777", "--tmpfs", "/tmp", "--perms", "1777", "--dir", _WORK]
    cmd += ["--perms", "0644", "--file", str(main_fd), _WORK + "/main.py"]
    made: set[str] = set()
    for root in _python_roots():
        parent = os.path.dirname(root)
        parents = []
        while parent not in ("/", "/tmp") and parent not in made:  # searchable, whatever the host
            parents.append(parent)
            made.add(parent)
            parent = os.path.dirname(parent)
        for path in reversed(parents):
            cmd += ["--perms", "0755", "--dir", path]
        cmd += ["--ro-bind", root, root]
        made.add(root)
    cmd += ["--remount-ro", "/", "--remount-ro", "/dev", "--chdir", _WORK]
    if seccomp_fd is not None:
        cmd += ["--seccomp", str(seccomp_fd)]
    return cmd


# Syscalls refused by the seccomp filter, per machine: (audit arch, unshare, clone, clone3,
# others). unshare/clone with CLONE_NEWUSER are refused (a user namespace gives capabilities
# inside it, kernel attack surface no test needs); clone3, whose flags a filter cannot read,
# answers ENOSYS (libc then uses clone); the others, refused outright: ptrace,
# process_vm_readv/writev, add_key, request_key, keyctl, bpf, userfaultfd, perf_event_open and
# io_uring_setup/enter/register.
_SYSCALLS = {
    "x86_64": (
        0xC000003E,
        272,
        56,
        435,
        (101, 310, 311, 248, 249, 250, 321, 323, 298, 425, 426, 427),
    ),
    "aarch64": (
        0xC00000B7,
        97,
        220,
        435,
        (117, 270, 271, 217, 218, 219, 280, 282, 241, 425, 426, 427),
    ),
}


@functools.cache
def _seccomp_filter() -> bytes | None:
    """A classic-BPF seccomp program for ``bwrap --seccomp`` (None on other machines)."""
    if platform.machine() not in _SYSCALLS:
        return None
    arch, unshare, clone, clone3, refused = _SYSCALLS[platform.machine()]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF opcodes
    allow, eperm, enosys = 0x7FFF0000, 0x50000 | errno.EPERM, 0x50000 | errno.ENOSYS
    # (label, opcode, k, label if true, label if false; "" = the next instruction).
    # seccomp_data: the syscall number at 0, the arch at 4, args[0] at 16 (its low 32 bits).
    program = [
        ("", ld, 4, "", ""),
        ("", jeq, arch, "", "eperm"),  # another ABI (i386 on x86_64): nothing
        ("", ld, 0, "", ""),
        ("", jge, 0x40000000, "eperm", ""),  # the x32 ABI
        *(("", jeq, nr, "eperm", "") for nr in refused),
        ("", jeq, clone3, "enosys", ""),
        ("", jeq, unshare, "flags", ""),
        ("", jeq, clone, "flags", "allow"),
        ("flags", ld, 16, "", ""),
        ("", jset, 0x10000000, "eperm", "allow"),  # CLONE_NEWUSER
        ("allow", ret, allow, "", ""),
        ("eperm", ret, eperm, "", ""),
        ("enosys", ret, enosys, "", ""),
    ]
    at = {label: i for i, (label, *_) in enumerate(program) if label}
    code = b""
    for i, (_, opcode, k, if_true, if_false) in enumerate(program):
        jt, jf = (at[label] - i - 1 if label else 0 for label in (if_true, if_false))
        code += struct.pack("=HBBI", opcode, jt, jf, k)
    return code


# ---- one run -------------------------------------------------------------------------------


def _source(code: str, tests: str) -> tuple[bytes, int]:
    """main.py (program, a blank line, tests) and where the tests start, in bytes."""

    def lines(text: str) -> bytes:  # Python reads \r\n and \r as \n; only \n is counted
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        return text.encode("utf-8", "surrogatepass")  # a lone surrogate: a SyntaxError there

    program = lines(code.rstrip("\n") + "\n\n")
    return program + lines(tests), len(program)


def _memfd(name: str, data: bytes) -> int:
    """An inheritable in-memory file holding ``data``, at offset 0 (bwrap copies it in)."""
    fd = os.memfd_create(name, 0)
    with open(fd, "wb", closefd=False) as f:
        f.write(data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _run(
    code: str, tests: str, stdin: str, limits: SandboxLimits, audit_hook: bool, isolated: bool
) -> SandboxResult:
    source, split = _source(code, tests)
    nonce = secrets.token_hex(16).encode()
    nonce_r, nonce_w = os.pipe()
    os.write(nonce_w, nonce)
    os.close(nonce_w)
    result_r, result_w = os.pipe()
    to_close = [nonce_r, result_r, result_w]
    host_work = None if isolated else tempfile.mkdtemp(prefix=_TAG + "-")
    work = host_work or _WORK
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work}
    try:
        if isolated:
            drop, isolation = os.geteuid() == 0, _bwrap_layers()
            main_fd, bpf = _memfd("main.py", source), _seccomp_filter()
            seccomp_fd = _memfd("seccomp", bpf) if bpf is not None else None
            fds = tuple(fd for fd in (nonce_r, result_w, main_fd, seccomp_fd) if fd is not None)
            to_close += fds[2:]
            prefix = _bwrap_command(main_fd, seccomp_fd, limits, env)
        else:
            drop = _weak_drop()
            isolation, prefix, fds = _weak_layers(drop), [], (nonce_r, result_w)
            with open(os.path.join(work, "main.py"), "wb") as f:
                f.write(source)
            if drop:
                os.chown(work, _NOBODY, _NOBODY)
                os.chmod(work, 0o700)
        if not audit_hook:
            isolation = tuple(x for x in isolation if x != "audit-hook")
        cfg = {
            "tag": _TAG,
            "owner": os.getpid(),  # whose sandbox it is, for ps
            "work": work,
            "split": split,
            "cpu": limits.cpu_s,
            "memory": limits.memory_mb * 1024 * 1024,
            "fsize": limits.max_file_bytes,
            "nofile": limits.max_open_files,
            "nproc": limits.max_processes if isolated or drop else 0,
            "drop": drop,
            "hook": audit_hook,
            "nonce_fd": nonce_r,
            "result_fd": result_w,
        }
        cmd = [*prefix, sys.executable, "-I", "-B", "-c", _GUARD, json.dumps(cfg)]
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            cwd=work if host_work else "/",
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"} if isolated else env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=fds,  # and nothing else of the trainer's (close_fds)
            start_new_session=True,  # its own process group, killed as a whole
        )
        for fd in fds:
            os.close(fd)
            to_close.remove(fd)
        return _collect(proc, stdin, limits, start, result_r, nonce, isolation)
    finally:
        for fd in to_close:
            os.close(fd)
        if host_work is not None:
            shutil.rmtree(host_work, ignore_errors=True)


def _collect(
    proc: subprocess.Popen,
    stdin: str,
    limits: SandboxLimits,
    start: float,
    result_r: int,
    nonce: bytes,
    isolation: tuple[str, ...],
) -> SandboxResult:
    """Feed stdin, capture bounded output, enforce the wall clock, then kill the group."""
    outs: list[list[bytes]] = [[], []]
    over = threading.Event()
    threads = [
        threading.Thread(target=_reader, args=(s, limits.max_output_bytes, o, over), daemon=True)
        for s, o in ((proc.stdout, outs[0]), (proc.stderr, outs[1]))
    ]
    threads.append(
        threading.Thread(
            target=_writer, args=(proc.stdin, stdin.encode("utf-8", "surrogatepass")), daemon=True
        )
    )
    for t in threads:
        t.start()
    deadline = start + limits.wall_s
    timed_out = False
    while proc.poll() is None:
        if over.is_set():
            break
        if time.perf_counter() > deadline:
            timed_out = True
            break
        time.sleep(0.01)
    _kill_group(proc)
    for t in threads:  # the readers end when every process holding the pipes has gone
        t.join(timeout=5.0)
    for stream in (proc.stdout, proc.stderr):
        stream.close()
    wall = time.perf_counter() - start
    os.set_blocking(result_r, False)
    try:
        report = os.read(result_r, 4096)
    except BlockingIOError:
        report = b""
    timed_out = timed_out or proc.returncode in (_CPU_EXIT, -signal.SIGXCPU)
    killed = timed_out or over.is_set()
    return SandboxResult(
        returncode=None if killed else proc.returncode,
        completed=report == nonce,
        stdout=b"".join(outs[0]).decode(errors="replace"),
        stderr=b"".join(outs[1]).decode(errors="replace"),
        timed_out=timed_out,
        output_truncated=over.is_set(),
        wall_s=wall,
        isolation=isolation,
    )


def _reader(stream, cap: int, out: list, over: threading.Event) -> None:
    """Keep up to ``cap`` bytes and read on to the end; past ``cap``, flag it (the caller kills)."""
    size = 0
    while chunk := stream.read1(65536):
        if size < cap:
            out.append(chunk[: cap - size])
        size += len(chunk)
        if size > cap:
            over.set()


def _writer(stream, data: bytes) -> None:
    try:
        stream.write(data)
        stream.close()
    except (BrokenPipeError, OSError, ValueError):
        pass


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group (bwrap, or the code and anything it started), then reap."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
