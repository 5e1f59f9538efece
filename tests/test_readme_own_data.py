"""The README's "Train on your own data" walkthrough, run as written: from a folder holding only
a data file and a reward module, `seqrl make-model`, `seqrl sft`, `seqrl train` with the user's
function as the verifier and `seqrl eval`, then the same through the Python API. Held-out
accuracy must rise in the SFT step, on the command line and in Python."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import seqrl

ROOT = Path(__file__).resolve().parents[1]
OWN_DATA = ROOT / "examples" / "own-data"


def _walkthrough() -> dict[str, list[str]]:
    """The fenced blocks of the README section, by language."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Train on your own data", 1)[1].split("\n### ", 1)[0]
    blocks: dict[str, list[str]] = {}
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", section, re.S):
        blocks.setdefault(lang, []).append(body)
    return blocks


def _seqrl_on_path(folder: Path) -> dict[str, str]:
    """An environment whose `seqrl` is a console script like the one pip installs (so the
    working directory is not on its import path by itself), running this checkout's seqrl."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    script = bin_dir / "seqrl"
    script.write_text(
        f"#!{sys.executable}\nimport sys\nfrom seqrl.cli import app\nsys.exit(app())\n"
    )
    script.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(Path(seqrl.__file__).resolve().parents[1])  # no "." on it
    return env


def _accuracy_pair(pattern: str, text: str) -> tuple[float, float]:
    found = re.search(pattern, text)
    assert found, f"no match for {pattern!r} in:\n{text}"
    return float(found.group(1)), float(found.group(2))


def test_the_shown_files_are_the_shipped_ones():
    blocks = _walkthrough()
    assert blocks["python"][0] == (OWN_DATA / "my_rewards.py").read_text(encoding="utf-8")
    rows = (OWN_DATA / "words.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(blocks["json"][0]) == json.loads(rows[0]) and len(rows) == 2400


@pytest.mark.slow
def test_the_walkthrough_runs_as_written_from_a_clean_folder(tmp_path):
    blocks = _walkthrough()
    (bash,), (_, api) = blocks["bash"], blocks["python"]
    folder = tmp_path / "my-project"
    folder.mkdir()
    for name in ("words.jsonl", "my_rewards.py"):  # all the user has
        shutil.copy(OWN_DATA / name, folder / name)
    env = _seqrl_on_path(tmp_path)

    cli = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", bash],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    out = cli.stdout + cli.stderr
    print(out)
    assert cli.returncode == 0, out
    before = _accuracy_pair(r"before SFT: ([\d.]+)[\s\S]*after SFT: ([\d.]+)", out)
    assert before[1] >= before[0] + 0.1, before  # the warm start learnt the task
    config = (folder / "runs" / "words" / "config.yaml").read_text()
    assert "reward: my_rewards:score" in config and "policy: warm" in config
    records = [json.loads(x) for x in (folder / "runs" / "words" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "reward/mean" in r] == list(range(1, 11))
    assert {"eval/greedy_acc/first", "eval/greedy_acc/smallest"} <= set(records[-1])
    assert "greedy_acc/largest" in out and "pass@8" in out  # seqrl eval's table, per kind

    api_file = folder / "train_api.py"
    api_file.write_text(api, encoding="utf-8")
    py = subprocess.run(
        [sys.executable, str(api_file)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    print(py.stdout + py.stderr)
    assert py.returncode == 0, py.stdout + py.stderr
    sft = _accuracy_pair(r"SFT: held-out greedy accuracy ([\d.]+) -> ([\d.]+)", py.stdout)
    assert sft[1] >= sft[0] + 0.1, sft
    assert sft == pytest.approx(before, abs=1e-3)  # the same rows, encoding and training
    assert re.search(r"eval: greedy [\d.]+, pass@8 [\d.]+", py.stdout)
    api_config = (folder / "runs" / "words-api" / "config.yaml").read_text()
    assert "reward: my_rewards:score" in api_config  # the imported function, by name
