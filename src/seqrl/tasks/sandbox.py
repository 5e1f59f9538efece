"""Run untrusted Python (a policy's code completion plus its tests) in a subprocess sandbox.

Layers, each applied where the OS allows it (``SandboxResult.isolation`` lists what was in force):

- a fresh temporary working directory, removed afterwards; a minimal environment (``python -I``);
- resource limits (``setrlimit``): CPU seconds, address space, file size, open files, and the
  number of processes, plus a wall-clock limit after which the whole process group is killed;
- ``unshare``: a new network namespace (no network) and a new PID namespace, so every process
  the code starts dies with it;
- when run as root and the interpreter's files are world-readable, the code runs as ``nobody``
  under a process-count limit (otherwise the audit hook and the PID namespace bound processes);
- a Python audit hook, installed before the code runs, that refuses opening files outside the
  working directory and the interpreter's own library paths, writing or deleting outside the
  working directory, starting processes (including importing ``_posixsubprocess``), sockets and
  every ``ctypes`` call (``ctypes`` itself is pre-imported, so numpy and the like still import);
- bounded capture: output beyond ``max_output_bytes`` is cut off and the process killed.

No layer is relied on alone: e.g. a fork bomb meets the audit hook, the process limit and the
PID namespace. This is a sandbox for reward computation on a trusted machine, not a security
boundary for hostile multi-tenant use (use a container or VM runtime for that).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

_NOBODY = 65534
_CPU_EXIT = 152  # the guard's exit status when the CPU-time limit is hit (128 + SIGXCPU)

# The runner: installs the audit hook, drops privileges, then runs the code as __main__.
# It only uses names bound before the hook is active, and the hook cannot be removed.
_GUARD = r"""
import os, resource, signal, sys
work = os.path.realpath(sys.argv[1])
cpu, mem, fsize, nofile, nproc = (int(x) for x in sys.argv[3:8])
_exit = os._exit
signal.signal(signal.SIGXCPU, lambda *_: _exit(152))  # the soft CPU limit: exit with its code
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # the hard limit SIGKILLs a second later
for res, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_FSIZE, fsize),
                   (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(res, (value, value))
del signal
if sys.argv[2] == "drop":  # root: become nobody, whose process count the limit then bounds
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
readable = tuple(os.path.realpath(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix,
                 sys.base_exec_prefix, *[p for p in sys.path if p]} if p)
os.chdir(work)
del resource
try:  # imported before the hook (it dlopens at import) so that numpy & co. can import it;
    import ctypes  # every ctypes call after this point is refused by the hook
except ImportError:
    pass
_deny = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
         "os.forkpty", "os.kill", "os.killpg", "socket.__new__", "socket.connect", "socket.bind",
         "ctypes.", "os.chdir", "os.chroot", "os.link",
         "os.symlink", "shutil.rmtree")
_realpath, _join, _isinstance, _str = os.path.realpath, os.path.join, isinstance, str
_sep, _wflags = os.sep, os.O_WRONLY | os.O_RDWR | os.O_CREAT
def _inside(path, roots):
    return any(path == r or path.startswith(r + _sep) for r in roots)
_deny_imports = ("_posixsubprocess", "_socket", "socket", "_multiprocessing")
def _hook(event, args):
    if event.startswith(_deny):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args[0].split(".")[0] in _deny_imports:
        raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    if event == "open":
        path, mode = args[0], args[1]
        if _isinstance(path, int):
            return
        if _isinstance(path, bytes):
            path = path.decode(errors="replace")
        path = _realpath(_join(work, _str(path)))
        writing = mode is not None and any(c in _str(mode) for c in "wax+")
        if _isinstance(args[2], int) and args[2] & _wflags:
            writing = True
        if not _inside(path, (work,)) and (writing or not _inside(path, readable)):
            raise PermissionError(f"sandbox: opening {path!r} is not allowed")
    elif event in ("os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.truncate", "os.chmod",
                   "os.chown", "os.utime"):
        target = args[0]
        if not _isinstance(target, int) and not _inside(_realpath(_join(work, _str(target))), (work,)):
            raise PermissionError(f"sandbox: {event} outside the working directory")
sys.addaudithook(_hook)
del os, sys
import runpy
runpy.run_path("main.py", run_name="__main__")
"""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run; the defaults suit unit tests of a short function."""

    wall_s: float = 5.0
    cpu_s: int = 5
    memory_mb: int = 512  # address space (RLIMIT_AS)
    max_processes: int = 64  # RLIMIT_NPROC of the user the code runs as (when started as root)
    max_output_bytes: int = 64 * 1024  # per stream
    max_file_bytes: int = 4 * 1024 * 1024
    max_open_files: int = 64


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None  # None when killed for time or output
    stdout: str
    stderr: str
    timed_out: bool
    output_truncated: bool
    wall_s: float
    isolation: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Exited 0 within every limit."""
        return self.returncode == 0 and not self.timed_out and not self.output_truncated


@functools.cache
def _unshare_prefix() -> tuple[str, ...]:
    """The ``unshare`` arguments that work here (new net + PID namespaces), or () if none do."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    candidates = [(exe, "--net", "--pid", "--fork", "--kill-child")]
    if os.geteuid() != 0:  # unprivileged: a user namespace first
        candidates = [(exe, "--user", "--map-root-user", *c[1:]) for c in candidates]
    for prefix in candidates:
        try:
            done = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return prefix
    return ()


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


def _reader(stream, cap: int, out: list, over: threading.Event) -> None:
    """Read up to ``cap`` bytes; on more, flag it (the caller then kills the process)."""
    size = 0
    while chunk := stream.read1(65536):
        out.append(chunk[: max(0, cap - size)])
        size += len(chunk)
        if size > cap:
            over.set()
            return


def run_python(code: str, *, stdin: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
    """Run ``code`` as a Python script in the sandbox and return its output and exit status.

    Never raises for anything the code does; raises only if the sandbox itself cannot start
    (no Python executable). The working directory is removed before returning.
    """
    limits = limits or SandboxLimits()
    work = tempfile.mkdtemp(prefix="seqrl-sandbox-")
    isolation = ["workdir", "rlimits", "audit-hook", "process-group"]
    try:
        with open(os.path.join(work, "main.py"), "w") as f:
            f.write(code)
        guard = os.path.join(work, ".guard.py")
        with open(guard, "w") as f:
            f.write(_GUARD)
        drop = os.geteuid() == 0 and _world_readable(sys.base_prefix)
        if drop:
            os.chown(work, _NOBODY, _NOBODY)
            os.chmod(work, 0o700)
            isolation.append("unprivileged-user")
        prefix = _unshare_prefix()
        if prefix:
            isolation += ["no-network", "pid-namespace"]
        numbers = (
            limits.cpu_s,
            limits.memory_mb * 1024 * 1024,
            limits.max_file_bytes,
            limits.max_open_files,
            limits.max_processes,
        )
        cmd = [*prefix, sys.executable, "-I", "-B", guard, work, "drop" if drop else "keep"]
        cmd += [str(n) for n in numbers]
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            cwd=work,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, killed as a whole
        )
        outs: list[list[bytes]] = [[], []]
        over = threading.Event()
        readers = [
            threading.Thread(
                target=_reader, args=(s, limits.max_output_bytes, o, over), daemon=True
            )
            for s, o in ((proc.stdout, outs[0]), (proc.stderr, outs[1]))
        ]
        for t in readers:
            t.start()
        try:
            proc.stdin.write(stdin.encode())
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
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
        for t in readers:
            t.join(timeout=2.0)
        for stream in (proc.stdout, proc.stderr):
            stream.close()
        wall = time.perf_counter() - start
        timed_out = timed_out or proc.returncode in (_CPU_EXIT, -signal.SIGXCPU)
        killed = timed_out or over.is_set()
        return SandboxResult(
            returncode=None if killed else proc.returncode,
            stdout=b"".join(outs[0]).decode(errors="replace"),
            stderr=b"".join(outs[1]).decode(errors="replace"),
            timed_out=timed_out,
            output_truncated=over.is_set(),
            wall_s=wall,
            isolation=tuple(isolation),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group (the code and anything it started), then reap."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
