"""The code sandbox: correct programs run; hostile ones score nothing, leave nothing behind and
never raise. Every case runs a real subprocess."""

import glob
import os
import tempfile
import time

import pytest

from seqrl.tasks.sandbox import SandboxLimits, run_python

LIMITS = SandboxLimits(wall_s=3.0, cpu_s=3, memory_mb=512, max_output_bytes=64 * 1024)


def _sandbox_processes() -> list[str]:
    found = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(cmdline, "rb") as f:
                text = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "seqrl-sandbox-" in text:
            found.append(text)
    return found


def test_a_correct_program_runs_with_stdin_and_its_exit_status():
    r = run_python("print(input()[::-1])", stdin="hello\n", limits=LIMITS)
    assert r.ok and r.stdout == "olleh\n" and r.returncode == 0
    r = run_python("import sys; print('x'); sys.exit(3)", limits=LIMITS)
    assert not r.ok and r.returncode == 3 and r.stdout == "x\n"
    r = run_python("assert 1 + 1 == 3", limits=LIMITS)
    assert not r.ok and "AssertionError" in r.stderr


def test_files_inside_the_working_directory_are_allowed():
    r = run_python("open('a.txt', 'w').write('hi'); print(open('a.txt').read())", limits=LIMITS)
    assert r.ok and r.stdout == "hi\n"


OUTSIDE = os.path.join(tempfile.gettempdir(), "seqrl-sandbox-escape-check")
VICTIM = os.path.join(
    tempfile.gettempdir(), "seqrl-sandbox-victim"
)  # a file the code must not touch

HOSTILE = {
    "infinite loop": "while True: pass",
    "sleep": "import time; time.sleep(60)",
    "fork bomb": "import os\nwhile True: os.fork()",
    "subprocess": "import subprocess; subprocess.run(['sh', '-c', 'sleep 60 &'])",
    "raw fork_exec": "import _posixsubprocess",
    "os.system": "import os; os.system('sleep 60 &')",
    "multiprocessing": "import multiprocessing as m; m.Process(target=print).start()",
    "memory bomb": "x = bytearray(8 * 10**9)",
    "memory creep": "x = []\nwhile True: x.append(' ' * 10**7)",
    "write outside": f"open({OUTSIDE!r}, 'w').write('x')",
    "os.open outside": f"import os; os.open({OUTSIDE!r}, os.O_CREAT | os.O_WRONLY)",
    "delete outside": f"import os; os.remove({VICTIM!r})",
    "overwrite outside": f"open({VICTIM!r}, 'w').write('owned')",
    "read the trainer's files": f"print(open({os.path.abspath(__file__)!r}).read())",
    "read /etc": "print(open('/etc/passwd').read())",
    "socket": "import socket; socket.create_connection(('127.0.0.1', 22), timeout=1)",
    "ctypes": "import ctypes; ctypes.CDLL(None).fork()",
    "print gigabytes": "import sys\nwhile True: sys.stdout.write('x' * 65536)",
    "huge file": "f = open('big', 'wb')\nwhile True: f.write(b'x' * 2**20)",
    "stderr flood": "import sys\nwhile True: sys.stderr.write('y' * 65536)",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_code_scores_nothing_and_leaves_nothing_behind(name):
    if os.path.exists(OUTSIDE):
        os.remove(OUTSIDE)
    with open(VICTIM, "w") as f:
        f.write("intact")
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "seqrl-sandbox-*")))
    start = time.perf_counter()
    r = run_python(HOSTILE[name], limits=LIMITS)  # never raises
    elapsed = time.perf_counter() - start
    assert not r.ok, (name, r)
    assert elapsed < LIMITS.wall_s + 3.0, elapsed  # the wall-clock limit holds
    assert len(r.stdout) <= LIMITS.max_output_bytes and len(r.stderr) <= LIMITS.max_output_bytes
    assert not os.path.exists(OUTSIDE)
    with open(VICTIM) as f:
        assert f.read() == "intact"
    after = set(glob.glob(os.path.join(tempfile.gettempdir(), "seqrl-sandbox-*"))) - {VICTIM}
    assert after <= before, after - before  # the working directory is removed
    time.sleep(0.05)
    assert _sandbox_processes() == []  # nothing keeps running


def test_limits_are_the_reason_given():
    assert run_python("while True: pass", limits=LIMITS).timed_out
    cpu_bound = SandboxLimits(wall_s=20.0, cpu_s=1)  # the CPU-time limit, long before the wall
    r = run_python("while True: pass", limits=cpu_bound)
    assert r.timed_out and r.wall_s < 5.0, r
    flood = run_python("while True: print('x' * 1000)", limits=LIMITS)
    assert flood.output_truncated and flood.returncode is None
    assert "PermissionError" in run_python("import os; os.fork()", limits=LIMITS).stderr
    assert {"workdir", "rlimits", "audit-hook", "process-group"} <= set(
        run_python("pass", limits=LIMITS).isolation
    )


def test_namespaces_when_unshare_works():
    r = run_python("pass", limits=LIMITS)
    if "no-network" not in r.isolation:
        pytest.skip("unshare cannot create network/PID namespaces on this machine")
    code = "import os; print(os.readlink('/proc/self/ns/net')); print(os.getpid())"
    net, pid = run_python(code, limits=LIMITS).stdout.split()
    assert net != os.readlink("/proc/self/ns/net")  # its own network namespace: no network
    assert pid == "1"  # first process of its own PID namespace: all it starts dies with it
