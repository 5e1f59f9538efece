"""The code sandbox: correct programs run, limits give their reason, isolation is what it says or
the run is refused. Every case runs a real subprocess. Hostile programs: tests/security."""

import os
import stat

import pytest

from seqrl.tasks import sandbox
from seqrl.tasks.filetask import FileTask
from seqrl.tasks.sandbox import SandboxLimits, SandboxUnavailableError, check_sandbox, run_python

LIMITS = SandboxLimits(wall_s=3.0, cpu_s=3, memory_mb=512, max_output_bytes=64 * 1024)


def test_a_correct_program_runs_with_stdin_and_its_exit_status():
    r = run_python("print(input()[::-1])", stdin="hello\n", limits=LIMITS)
    assert r.ok and r.completed and r.stdout == "olleh\n" and r.returncode == 0
    r = run_python("import sys; print('x'); sys.exit(3)", limits=LIMITS)
    assert not r.ok and r.returncode == 3 and r.stdout == "x\n"
    r = run_python("assert 1 + 1 == 3", limits=LIMITS)
    assert not r.ok and "AssertionError" in r.stderr and 'File "main.py", line 1' in r.stderr


def test_tests_run_after_the_code_in_its_namespace_with_their_own_line_numbers():
    code = "def add(a, b):\n    return a + b\n"
    assert run_python(code, tests="assert add(2, 3) == 5", limits=LIMITS).ok
    r = run_python(code, tests="x = 1\nassert add(2, 3) == 6", limits=LIMITS)
    assert not r.ok and 'File "main.py", line 5' in r.stderr  # code, blank line, tests


def test_exit_status_zero_is_not_success():
    for code in ("import sys; sys.exit(0)", "import os; os._exit(0)"):
        r = run_python(code, tests="assert False", limits=LIMITS)
        assert r.returncode == 0 and not r.completed and not r.ok, (code, r)


def test_the_code_cannot_swallow_the_tests():
    # A trailing decorator would turn the first test into a no-op if the two were parsed as one.
    code = "def add(a, b):\n    return 0\n@(lambda f: lambda *a: None)\n"
    tests = "def check(candidate):\n    assert candidate(2, 3) == 5\ncheck(add)"
    r = run_python(code, tests=tests, limits=LIMITS)
    assert not r.ok and "SyntaxError" in r.stderr


def test_files_inside_the_working_directory_are_allowed():
    r = run_python("open('a.txt', 'w').write('hi'); print(open('a.txt').read())", limits=LIMITS)
    assert r.ok and r.stdout == "hi\n"
    code = "import os; open('a', 'w'); os.rename('a', 'b'); os.remove('b'); print(os.listdir())"
    r = run_python(code, limits=LIMITS)
    assert r.ok and r.stdout == "['main.py']\n"


def test_limits_are_the_reason_given():
    r = run_python("import time; time.sleep(10)", limits=SandboxLimits(wall_s=0.5))
    assert r.timed_out and r.returncode is None and r.wall_s < 3.0, r
    cpu_bound = SandboxLimits(wall_s=20.0, cpu_s=1)  # the CPU-time limit, long before the wall
    r = run_python("while True: pass", limits=cpu_bound)
    assert r.timed_out and r.wall_s < 5.0, r
    flood = run_python("while True: print('x' * 1000)", limits=LIMITS)
    assert flood.output_truncated and flood.returncode is None
    assert "PermissionError" in run_python("import os; os.fork()", limits=LIMITS).stderr


def test_stdin_larger_than_a_pipe_that_the_code_never_reads():
    r = run_python("print('ok')", stdin="x" * 1_000_000, limits=LIMITS)
    assert r.ok and r.stdout == "ok\n"


def test_isolation_is_what_it_says():
    """Own user, network, PID namespace and files; nothing of the trainer's but the harness."""
    inherited_r, inherited_w = os.pipe()  # an fd of the trainer's that the code must not get
    os.set_inheritable(inherited_w, True)
    code = (
        "import os\n"
        "print(os.getuid(), os.getgid(), os.getpid() < 10)\n"
        "print(os.readlink('/proc/self/ns/net'))\n"
        "print(sorted(os.listdir('/proc/self/fd')))\n"
        "print((os.listdir('/tmp'), os.listdir('/home') if os.path.exists('/home') else []))\n"
        "print(sorted(os.environ))\n"
    )
    try:
        r = run_python(code, limits=LIMITS, audit_hook=False)  # the hook would refuse /proc
    finally:
        os.close(inherited_r)
        os.close(inherited_w)
    assert r.ok, r
    ids, net, fds, dirs, env = r.stdout.splitlines()
    assert ids == "65534 65534 True"
    assert net != os.readlink("/proc/self/ns/net")  # its own network namespace: no network
    assert len(eval(fds)) == 5  # stdin, stdout, stderr, the result pipe, listdir's own

    # /tmp holds the working directory, /home nothing, beside the read-only Python installation
    # where it lies there (a virtual environment under /tmp, say)
    def under(top: str) -> set[str]:
        return {r.split("/")[2] for r in sandbox._python_roots() if r.startswith(top + "/")}

    tmp, home = eval(dirs)
    assert set(tmp) == {"work"} | under("/tmp") and set(home) == under("/home")
    assert env == "['HOME', 'LANG', 'PATH', 'PWD', 'TMPDIR']"
    assert set(check_sandbox(LIMITS)) >= {"bubblewrap", "unprivileged-user", "no-network"}
    assert set(r.isolation) == set(check_sandbox(LIMITS)) - {"audit-hook"}


def test_threads_and_processes_work_under_the_seccomp_filter():
    code = "import concurrent.futures as f\nprint(sum(f.ThreadPoolExecutor(4).map(abs, [-1] * 8)))"
    assert run_python(code, limits=LIMITS).stdout == "8\n"
    code = "import os\npid = os.fork()\nos._exit(0) if pid == 0 else print(os.waitpid(pid, 0)[1])"
    r = run_python(code, limits=LIMITS, audit_hook=False)  # the hook would refuse fork
    assert r.ok and r.stdout == "0\n", r
    if "no-user-namespaces" in check_sandbox(LIMITS):
        status = run_python("print(open('/proc/self/status').read())", audit_hook=False).stdout
        assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status


def test_the_system_is_read_only_and_the_working_directory_is_bounded():
    code = "import os, sys\nfor p in ('/usr/x', sys.prefix + '/x', '/x', '/dev/x'):\n"
    code += "    try:\n        open(p, 'w')\n        print('wrote', p)\n    except OSError:\n"
    code += "        pass\nopen('big', 'wb').write(b'x' * 10**6)"
    r = run_python(code, limits=SandboxLimits(max_disk_bytes=2**19), audit_hook=False)
    assert "wrote" not in r.stdout and "No space left" in r.stderr, r


# ---- when the machine cannot sandbox -------------------------------------------------------


@pytest.fixture
def no_bwrap(monkeypatch):
    monkeypatch.setattr(sandbox, "_bwrap", lambda: None)
    monkeypatch.delenv("SEQRL_SANDBOX", raising=False)
    sandbox._bwrap_error.cache_clear()
    sandbox._warn_weak.cache_clear()
    yield
    sandbox._bwrap_error.cache_clear()


def test_without_bubblewrap_code_is_refused_with_the_fix(no_bwrap, tmp_path):
    with pytest.raises(SandboxUnavailableError, match="apt-get install bubblewrap") as err:
        run_python("print(1)", limits=LIMITS)
    assert "SEQRL_SANDBOX=weak" in str(err.value) and "not a security boundary" in str(err.value)
    path = tmp_path / "code.jsonl"
    path.write_text('{"prompt": "Write add(a, b).", "tests": "assert add(1, 2) == 3"}\n')
    with pytest.raises(SandboxUnavailableError):  # when the task is built, not at reward time
        FileTask(train=path, reward="code")
    assert FileTask(train=tmp_path / "code.jsonl", columns={"answer": "tests"}).reward == "math"


def test_bubblewrap_that_cannot_make_namespaces_is_refused(no_bwrap, monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(sandbox, "_bwrap", lambda: (str(fake), ""))
    with pytest.raises(SandboxUnavailableError, match="No permissions to create new namespace"):
        check_sandbox(LIMITS)


@pytest.mark.parametrize("opt_out", ["env", "limits"])
def test_the_weak_mode_is_explicit_and_says_so(no_bwrap, monkeypatch, opt_out):
    limits = LIMITS
    if opt_out == "env":
        monkeypatch.setenv("SEQRL_SANDBOX", "weak")
    else:
        limits = SandboxLimits(wall_s=3.0, require_isolation=False)
    with pytest.warns(RuntimeWarning, match="WITHOUT a sandbox boundary"):
        r = run_python(
            "def add(a, b):\n    return a + b", tests="assert add(1, 2) == 3", limits=limits
        )
    assert r.ok and "bubblewrap" not in r.isolation and "audit-hook" in r.isolation
    assert not run_python("import sys; sys.exit(0)", tests="assert 0", limits=limits).ok
    monkeypatch.setenv("SEQRL_SANDBOX", "off")
    with pytest.raises(ValueError, match="SEQRL_SANDBOX must be"):
        run_python("pass", limits=limits)
