"""File-backed tasks (math / code / exact rewards) and `seqrl eval` end to end on real files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from seqrl.evaluation import evaluate_samples
from seqrl.tasks.base import split_of
from seqrl.tasks.filetask import FileTask
from seqrl.tasks.rewards import RewardFunctionError, function_spec, load_function

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
    with pytest.raises(ValueError, match=r"unknown reward.*'module:function'"):
        FileTask(test=TOY, reward="vibes")
    with pytest.raises(
        ValueError, match=r"cannot import module 'no_such_module'.*working directory"
    ):
        FileTask(test=TOY, reward="no_such_module:score")
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
    assert "pass@2" in done.stdout and "avg@2" in done.stdout and "greedy_acc" in done.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and all(len(r["completions"]) == 2 for r in records)
    assert all({"greedy", "greedy_score"} <= set(r) for r in records)
    assert records[0]["prompt"].startswith("Gus has 4 marbles")  # the text the model was given


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


WORDS = [
    {"prompt": f"Which word comes first? {a} {b}", "answer": a, "kind": "first"}
    for a in ("owl", "fox", "cat", "dog", "eel", "yak")
    for b in ("ram", "hen", "bee", "elk", "ant", "bat", "cow")
]


def _words(tmp_path) -> Path:
    path = tmp_path / "words.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in WORDS))
    return path


def test_exact_compares_the_first_word_as_written(tmp_path):
    task = FileTask(test=_words(tmp_path), reward="exact")
    ex = task.examples("test")[0]  # answer "owl"
    assert task.score("  owl<eos> and more", ex) == 1.0  # stripped, cut at space or EOS marker
    assert task.score("Owl", ex) == 0.0 and task.score("owl.", ex) == 0.0  # case, punctuation
    assert task.extract_answer("owl is it") == "owl"


def test_a_user_function_is_the_verifier_by_name_or_as_a_callable(tmp_path, monkeypatch):
    (tmp_path / "filetask_rewards.py").write_text(
        "def score(completion, example):\n"
        "    words = completion.split()\n"
        "    return float(bool(words) and words[0].strip('.').lower() == example.answer)\n"
        "def half(completion, example):\n"
        "    return 0.5\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    task = FileTask(train=_words(tmp_path), reward="filetask_rewards:score")
    ex = task.examples("train")[0]
    assert task.score("Owl.", ex) == 1.0 and task.score("fox", ex) == 0.0
    assert task.extract_answer("owl") is None  # no parser: no majority vote (cons@k)
    assert task.sft_target(ex) == "owl"

    calls = []

    def graded(completion, example):  # defined here: usable in this process only
        calls.append(completion)
        return 0.25

    task = FileTask(train=_words(tmp_path), reward=graded)
    assert task.reward.startswith("callable:") and task.score("x", ex) == 0.25 and calls == ["x"]

    def broken(completion, example):
        raise KeyError("oops")

    bad = FileTask(train=_words(tmp_path), reward=broken)
    with pytest.raises(RewardFunctionError, match=r"reward function 'callable:.*broken'.*KeyError"):
        bad.score("owl", ex)
    nan = FileTask(train=_words(tmp_path), reward=lambda c, e: float("nan"))
    with pytest.raises(RewardFunctionError, match="not a finite number"):
        nan.score("owl", ex)


def test_function_spec_names_importable_functions_and_registers_the_rest(tmp_path, monkeypatch):
    (tmp_path / "spec_mod.py").write_text("def f(c, e):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import spec_mod

    assert function_spec(spec_mod.f) == "spec_mod:f"  # config.yaml can import it back
    assert function_spec("math") == "math"
    first, second = (lambda c, e: 0.0), (lambda c, e: 1.0)
    a, b = function_spec(first), function_spec(second)
    assert a != b and load_function(a) is first and load_function(b) is second
    assert function_spec(first) == a  # the same function keeps its name
    with pytest.raises(ValueError, match="pass it again"):
        load_function("callable:gone")


def test_one_file_holds_out_a_tenth_by_prompt_hash(tmp_path):
    task = FileTask(train=_words(tmp_path), reward="exact", hold_out=True)
    train, test = task.examples("train"), task.examples("test")
    assert len(train) + len(test) == len(WORDS) and test
    assert all(split_of(e.prompt) == "test" for e in test)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    # the rule does not depend on the row order
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(json.dumps(r) + "\n" for r in reversed(WORDS)))
    again = FileTask(train=shuffled, reward="exact", hold_out=True).examples("test")
    assert {e.prompt for e in again} == {e.prompt for e in test}


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_rows_render_with_the_template_and_their_system_turn(tmp_path):
    from seqrl.models import load_policy
    from seqrl.tasks.prompts import rendered

    path = tmp_path / "chat.jsonl"
    row = {
        "messages": [
            {"role": "system", "content": "One word."},
            {"role": "user", "content": "first? owl fox"},
        ],
        "answer": "owl",
    }
    path.write_text(
        json.dumps(row) + "\n" + json.dumps({"prompt": "last? owl fox", "answer": "fox"})
    )
    task = FileTask(train=path, reward="exact", prompt_template="Q: {prompt}")
    chat_row, plain_row = task.examples("train")
    _, tok = load_policy("builtin:nano")
    with pytest.raises(ValueError, match="no chat template"):
        rendered(tok, [chat_row], chat=False)  # a chat row needs one, asked for or not
    tok.chat_template = CHATML
    seen = rendered(tok, [chat_row, plain_row], chat=False)
    assert seen[0].prompt == (
        "<|im_start|>system\nOne word.<|im_end|>\n<|im_start|>user\nQ: first? owl fox<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert seen[1].prompt == "<|im_start|>user\nQ: last? owl fox<|im_end|>\n<|im_start|>assistant\n"
    assert rendered(tok, [plain_row], chat=False)[0].prompt == "Q: last? owl fox"
    assert seen[0].answer == "owl"  # verification never sees the template


@pytest.mark.slow
def test_the_seqrl_command_imports_a_reward_module_from_the_working_directory(tmp_path):
    """As `python -m` would: no PYTHONPATH=. for ./my_rewards.py (a console script's own
    folder is on its import path, not the working directory)."""
    import seqrl

    (tmp_path / "bin").mkdir()
    launcher = tmp_path / "bin" / "seqrl"
    launcher.write_text(
        f"#!{sys.executable}\nimport sys\nfrom seqrl.cli import app\nsys.exit(app())\n"
    )
    launcher.chmod(0o755)
    project = tmp_path / "project"
    project.mkdir()
    _words(project)
    (project / "my_rewards.py").write_text(
        "def score(completion, example):\n    return float(completion.startswith(example.answer))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(seqrl.__file__).resolve().parents[1])}
    args = ["--reward", "my_rewards:score", "--k", "1", "--limit", "2", "--max-new-tokens", "2"]
    done = subprocess.run(
        [str(launcher), "eval", "builtin:nano", "--data", "words.jsonl", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "greedy_acc" in done.stdout
