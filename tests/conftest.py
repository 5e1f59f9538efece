"""Suite-wide test settings.

Code-reward tests run programs in the bubblewrap sandbox (``seqrl.tasks.sandbox``). Where the
machine cannot provide it (no ``bwrap``, or no namespaces), they are skipped with the reason and
the fix, so the suite still runs on a fresh machine; CI installs bubblewrap and sets
``SEQRL_REQUIRE_SANDBOX=1``, which turns those skips into failures.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_SANDBOX_FILES = {"test_sandbox.py", "test_codereward.py", "test_hostile.py"}
_SANDBOX_TESTS = {"test_code_file_task_runs_the_rows_tests"}


def _needs_sandbox(item: pytest.Item) -> bool:
    if "no_bwrap" in getattr(item, "fixturenames", ()):  # fakes a machine without bubblewrap
        return False
    return Path(str(item.fspath)).name in _SANDBOX_FILES or item.originalname in _SANDBOX_TESTS


def pytest_collection_modifyitems(config, items) -> None:
    from seqrl.tasks.sandbox import _bwrap_error

    error = _bwrap_error()
    if error is None or os.environ.get("SEQRL_REQUIRE_SANDBOX") == "1":
        return
    skip = pytest.mark.skip(
        reason=f"needs the bubblewrap sandbox, unavailable here: {error} "
        "(apt-get install bubblewrap; see README, Security model)"
    )
    for item in items:
        if _needs_sandbox(item):
            item.add_marker(skip)
