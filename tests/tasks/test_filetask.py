"""File-backed tasks (math / code / exact rewards) and `seqrl eval` end to end on real files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from seqrl.evaluation import evaluate_samples
from seqrl.tasks.filetask import FileTask

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "examples" / "data" / "gsm8k_toy.jsonl"


def test_math_file_task_scores_gsm8k_style_references():
    task = FileTask(test=TOY, columns={"prompt": "question"}, prompt_template="Q: {prompt}\nA:")
    first = task.examples("test")[0]
    assert first.prompt.startswith("Q: Gus has 4 marbles") and first.prompt.endswith("\nA:")
    assert task.reference(first) == "13"
    assert task.score("22 - 9 = 13, so \\boxed{13}", first) == 1.0
    assert task.score("#### 14", first) == 0.0
    assert task.extract_answer("it is 13") == "13"
    with pytest.raises(ValueError, match="no 'train' file"):
        task.examples("train")


def test_code_file_task_runs_the_rows_tests(tmp_path):
    path = tmp_path / "code.jsonl"
    path.write_text(
        json.dumps({"prompt": "Write add(a, b).", "tests": "assert add(1, 2) == 3"}) + "\n"
    )
    task = FileTask(train=path, reward="code")
    ex = task.examples("train")[0]
    assert task.score("```python\ndef add(a, b):\n    return a + b\n```", ex) == 1.0
    assert task.score("```python\ndef add(a, b):\n    return a * b\n```", ex) == 0.0
    assert task.extract_answer("anything") is None


def test_bad_task_arguments_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown reward"):
        FileTask(test=TOY, reward="vibes")
    with pytest.raises(ValueError, match="train file, a test file or both"):
        FileTask()
    with pytest.raises(ValueError, match=r"\{prompt\}"):
        FileTask(test=TOY, columns={"prompt": "question"}, prompt_template="no slot")


def test_evaluate_samples_per_item_and_summary():
    task = FileTask(test=TOY, columns={"prompt": "question"})
    items = task.examples("test", 2)
    refs = [task.reference(e) for e in items]
    completions = [[f"#### {refs[0]}", "#### 0", "#### 0", f"#### {refs[0]}"], ["#### 0"] * 4]
    records, summary = evaluate_samples(task, items, completions, ks=[1, 2, 4])
    assert [r["correct"] for r in records] == [2, 0]
    assert records[0]["pass@2"] == pytest.approx(1 - 1 / 6)  # 1 − C(2,2)/C(4,2)
    assert records[0]["cons@4"] == 1.0  # tie 2–2: the first answer seen (the right one) wins
    assert summary["avg@4"] == pytest.approx(0.25) and summary["pass@4"] == pytest.approx(0.5)
    assert summary["pass@1_ci_low"] <= summary["pass@1"] <= summary["pass@1_ci_high"]


@pytest.mark.slow
def test_seqrl_eval_cli_on_a_data_file(tmp_path):
    out = tmp_path / "items.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "seqrl",
            "eval",
            "builtin:nano",
            "--data",
            str(TOY),
            "--column",
            "prompt=question",
            "--k",
            "2",
            "--limit",
            "3",
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "pass@2" in done.stdout and "avg@2" in done.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and all(len(r["completions"]) == 2 for r in records)


@pytest.mark.slow
def test_seqrl_eval_cli_errors(tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "seqrl", "eval", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    both = run("builtin:nano")
    assert both.returncode == 2 and "exactly one of --data" in both.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{oops\n')
    err = run("builtin:nano", "--data", str(bad))
    assert err.returncode == 2 and "bad.jsonl, row 2: not valid JSON" in err.stderr
    zero = run("builtin:nano", "--task", "addition", "--k", "0")
    assert (
        zero.returncode == 2
        and "--k" in zero.stderr
        and "greater than or equal to 1" in zero.stderr
    )
