"""The code sandbox against hostile completions (the programs are in hostile.py).

Every case scores 0 and leaves the host as it was: with every layer; with the bubblewrap boundary
alone (audit hook off); with the audit hook alone (no bubblewrap, the weak mode); and as an
unprivileged user (re-run as nobody when the tests run as root).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import hostile
import pytest

from seqrl.tasks import sandbox
from seqrl.tasks.codereward import score_code

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def host():
    host = hostile.setup_host()
    yield host
    hostile.teardown_host(host)


@pytest.fixture
def weak(monkeypatch):
    """No bubblewrap: SEQRL_SANDBOX=weak runs code with the in-process layers only."""
    monkeypatch.setattr(sandbox, "_bwrap", lambda: None)
    monkeypatch.setenv("SEQRL_SANDBOX", "weak")
    sandbox._bwrap_error.cache_clear()
    sandbox._warn_weak.cache_clear()  # it warns once per process
    yield
    sandbox._bwrap_error.cache_clear()


ALL = (*hostile.REWARD_HACKS, *hostile.ESCAPES, *hostile.RESOURCES)


@pytest.mark.parametrize("name", ALL)
def test_hostile_code_scores_nothing_and_leaves_nothing_behind(name, host):
    assert hostile.problems(hostile.all_cases(host)[name], host) == []


BOUNDARY = [n for n in ALL if n not in hostile.NEED_THE_HOOK]


@pytest.mark.parametrize("name", BOUNDARY)
def test_the_bubblewrap_boundary_holds_without_the_audit_hook(name, host):
    assert hostile.problems(hostile.all_cases(host)[name], host, audit_hook=False) == []


HOOK_ALONE = [
    *hostile.REWARD_HACKS,
    *(n for n in hostile.ESCAPES if "outside" in n or "rename" in n or "dir_fd" in n),
    "plant a .pth in site-packages",
    "chmod the interpreter's files",
    "read the trainer's files",
    "list the trainer's directory",
    "list /root",
]


@pytest.mark.parametrize("name", HOOK_ALONE)
def test_the_audit_hook_alone_refuses_files_outside_and_forged_passes(name, host, weak):
    with pytest.warns(RuntimeWarning, match="WITHOUT a sandbox boundary"):
        found, result = hostile.run_case(hostile.all_cases(host)[name], host)
    assert found == []
    if name in hostile.ESCAPES:  # refused by the hook, not by luck
        assert "PermissionError: sandbox:" in result.stderr


def test_the_audit_hook_survives_the_frame_walking_bypass(host):
    scored = score_code(hostile.audit_hook_bypass(host), hostile.TESTS, limits=hostile.LIMITS)
    assert scored.score == 0.0 and scored.result.stdout == "hook on\n", scored


def test_an_always_equal_object_passes_an_assert_the_verifier_cannot_tell():
    """A documented limit: the tests compare the program's own objects, in its own process."""
    program = "class Anything:\n    __eq__ = lambda self, other: True\n"
    program += "def add(a, b):\n    return Anything()"
    assert score_code(program, hostile.TESTS, limits=hostile.LIMITS).score == 1.0


def _as_nobody(*cmd, **kwargs) -> subprocess.CompletedProcess:
    setpriv = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent"}
    return subprocess.run([*setpriv, *cmd], capture_output=True, text=True, env=env, **kwargs)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the tests already run as an unprivileged user")
def test_the_battery_holds_for_an_unprivileged_trainer():
    """Copy the sandbox and the battery where nobody can read them, and run it as nobody."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    pythons = ["/usr/bin/python3", "/usr/local/bin/python3", sys.executable]
    check = (  # a whole installation nobody can read, not just an executable binary
        "import os, sys; assert sys.version_info >= (3, 10); "
        "assert all(os.access(p, os.R_OK | os.X_OK) for p in (sys.prefix, sys.executable))"
    )
    python = next((p for p in pythons if _as_nobody(p, "-c", check).returncode == 0), None)
    if python is None:
        pytest.skip("no Python interpreter (3.10+) that nobody can run")
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:  # not $TMPDIR: nobody must reach it
        report = _battery_as_nobody(python, Path(tmp))
    userns = _as_nobody("bwrap", "--unshare-all", "--unshare-user", "--ro-bind", "/", "/", "true")
    if userns.returncode == 0:  # nobody can use bubblewrap here: the whole battery must hold
        assert report["uid"] == 65534
        assert {name: found for name, found in report["problems"].items() if found} == {}
        assert len(report["problems"]) > len(ALL)
    else:  # no user namespaces for nobody: a clear refusal that says how to fix it
        assert "user namespaces" in report["unavailable"], report
        assert "SEQRL_SANDBOX=weak" in report["unavailable"]


def _battery_as_nobody(python: str, tmp: Path) -> dict:
    (tmp / "seqrl" / "tasks").mkdir(parents=True)
    shutil.copy(ROOT / "src" / "seqrl" / "__init__.py", tmp / "seqrl")
    for module in (ROOT / "src" / "seqrl" / "tasks").glob("*.py"):
        shutil.copy(module, tmp / "seqrl" / "tasks")
    shutil.copy(Path(hostile.__file__), tmp)
    for path in [tmp, *tmp.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    run = f"import sys; sys.path[:0] = [{str(tmp)!r}]; import hostile; hostile.main()"
    done = _as_nobody(python, "-c", run, cwd=tmp, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])
