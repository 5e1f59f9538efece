"""``seqrl train`` reports a bad config before it imports the heavy machinery."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.mark.slow
def test_a_config_error_is_printed_before_transformers_or_the_trainer_is_imported(tmp_path):
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    command = ["-m", "seqrl", "train", "--set", "rollout.group_sise=8"]
    out = subprocess.run(
        [sys.executable, "-X", "importtime", *command, "--set", f"output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    error = next(i for i, line in enumerate(lines) if line.startswith("error:"))
    assert "did you mean 'rollout.group_size'" in lines[error]
    imported = {line.split("|")[-1].strip() for line in lines if line.startswith("import time:")}
    assert "pydantic" in imported  # (the import log is really there)
    # (seqrl.tasks itself is light: the config reads the reward bound from seqrl.tasks.rewards)
    for heavy in (
        "transformers",
        "seqrl.models",
        "seqrl.train",
        "seqrl.rollout",
        "seqrl.tasks.filetask",
    ):
        assert heavy not in imported, f"{heavy} was imported before the config error"
    assert not any(tmp_path.iterdir())
