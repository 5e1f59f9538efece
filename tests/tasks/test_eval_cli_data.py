"""`seqrl eval` on awkward data: --limit bounds, rows too long for the model, bytes that are not
UTF-8 (in-process through typer's runner: the model is the nano one, one sample of 2 tokens)."""

import json

import pytest
from typer.testing import CliRunner

from seqrl.cli import app


def _eval(*args):
    common = ["eval", "builtin:nano", "--k", "1", "--max-new-tokens", "2", "--reward", "exact"]
    return CliRunner().invoke(app, [*common, *args])


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"{a}+1=", "answer": a + 1}) + "\n" for a in range(3))
    )
    return path


def test_limit_zero_is_a_usage_error_and_a_large_limit_evaluates_everything(data, tmp_path):
    zero = _eval("--data", str(data), "--limit", "0")
    assert (
        zero.exit_code == 2
        and "--limit" in zero.output
        and "greater than or equal to 1" in zero.output
    )
    out = tmp_path / "items.jsonl"
    many = _eval("--data", str(data), "--limit", "50", "--out", str(out))
    assert many.exit_code == 0, many.output
    assert "--limit 50 is more than the 3 items: all are used" in many.output
    assert len(out.read_text().splitlines()) == 3
    two = _eval("--data", str(data), "--limit", "2", "--out", str(out))
    assert (
        two.exit_code == 0 and len(out.read_text().splitlines()) == 2 and "note" not in two.output
    )


def test_a_row_longer_than_the_context_is_named_or_skipped(data, tmp_path):
    with data.open("a") as f:
        f.write(json.dumps({"prompt": "1+" * 200_000 + "1=", "answer": 1}) + "\n")
    long = _eval("--data", str(data))
    assert long.exit_code == 2
    assert f"{data}, row 4: the prompt has 400002 characters" in long.output
    assert (
        "more than the 254 allowed (the model's 256-position context minus the 2-token"
        in long.output
    )
    assert "--on-error skip" in long.output
    out = tmp_path / "items.jsonl"
    skip = _eval("--data", str(data), "--on-error", "skip", "--out", str(out))
    assert skip.exit_code == 0, skip.output
    assert "note: 1 too long rows skipped; first: " in skip.output
    assert len(out.read_text().splitlines()) == 3
    own = _eval("--data", str(data), "--on-error", "skip", "--max-prompt-tokens", "3")
    assert own.exit_code == 2 and "no item left" in own.output  # "0+1=" is 4 tokens > 3


def test_bytes_that_are_not_utf8_name_the_row_or_are_skipped(data, tmp_path):
    data.write_bytes(data.read_bytes() + b'{"prompt": "caf\xe9", "answer": "1"}\n')
    bad = _eval("--data", str(data))
    assert (
        bad.exit_code == 2
        and "d.jsonl, row 4: byte 0xe9 at character 16 is not UTF-8" in bad.output
    )
    assert "pass --on-error skip to leave such rows out" in bad.output
    skip = _eval("--data", str(data), "--on-error", "skip")
    assert skip.exit_code == 0, skip.output
    assert "note: 1 malformed rows skipped; first: " in skip.output


def test_code_rewards_without_a_sandbox_are_a_clear_error_not_a_traceback(monkeypatch, tmp_path):
    from seqrl.tasks import sandbox

    monkeypatch.setattr(sandbox, "_bwrap", lambda: None)  # a machine without bubblewrap
    monkeypatch.delenv("SEQRL_SANDBOX", raising=False)
    sandbox._bwrap_error.cache_clear()
    try:
        path = tmp_path / "code.jsonl"
        path.write_text(json.dumps({"prompt": "add", "tests": "assert add(1, 2) == 3"}) + "\n")
        common = ["--k", "1", "--max-new-tokens", "2"]
        out = CliRunner().invoke(app, ["eval", "builtin:nano", "--data", str(path), *common,
                                       "--reward", "code"])  # fmt: skip
        assert out.exit_code == 2, out.output
        assert "apt-get install bubblewrap" in out.output
        assert out.exception is None or isinstance(out.exception, SystemExit)
        train = CliRunner().invoke(app, ["train", "--no-progress", "--set", "task.name=file",
            f"--set=task.train_file={path}", f"--set=task.test_file={path}",
            "--set=task.reward=code", "--set=model.policy=builtin:nano",
            "--set=rollout.max_new_tokens=4", f"--set=output_dir={tmp_path}"])  # fmt: skip
        assert train.exit_code == 2, train.output
        assert "apt-get install bubblewrap" in train.output
        assert train.exception is None or isinstance(train.exception, SystemExit)
    finally:
        sandbox._bwrap_error.cache_clear()
