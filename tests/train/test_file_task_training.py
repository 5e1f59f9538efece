"""`seqrl train` on problems from data files: the same loop, verifiers chosen by name."""

import json
from pathlib import Path

import pytest

from seqrl.config import ConfigError, load_config
from seqrl.tasks import get_task
from seqrl.train.trainer import Trainer
from support import train_cli

TOY = Path(__file__).resolve().parents[2] / "examples" / "data" / "gsm8k_toy.jsonl"


def _addition_file(path: Path, split: str, n: int) -> Path:
    task = get_task("addition", digits=3, seed=1234)
    rows = [{"question": e.prompt, "solution": e.answer} for e in task.examples(split, n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_rl_on_a_data_file_fixes_the_demo_slip(tmp_path):
    """Addition problems written to JSONL with other column names, exact-match reward: the file
    path trains like the built-in task (the demo's slip is fixed on the file's held-out rows)."""
    train = _addition_file(tmp_path / "train.jsonl", "train", 1000)
    test = _addition_file(tmp_path / "test.jsonl", "test", 128)
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "name=file",
            "preset=grpo",
            "algo.loss.kl_coef=0",
            "optim.lr=1e-4",
            "rollout.prompts_per_step=32",
            "algo.num_minibatches=1",
            "task.name=file",
            f"task.train_file={train}",
            f"task.test_file={test}",
            "task.columns.prompt=question",
            "task.columns.answer=solution",
            "task.reward=exact",
            "rollout.max_new_tokens=6",
            "train.eval_samples=1",
            "log.tensorboard=false",
        ],
    )
    trainer = Trainer(cfg, progress=False)
    assert len(trainer.train_examples) == 1000 and len(trainer.eval_examples) == 128
    before = trainer.evaluate()["eval/greedy_acc"]
    for step in range(1, 21):
        trainer.train_step(step)
    after = trainer.evaluate()["eval/greedy_acc"]
    assert after >= before + 0.10, (before, after)


@pytest.mark.slow
def test_gsm8k_style_file_from_the_cli(tmp_path):
    done = train_cli(
        [
            f"output_dir={tmp_path}",
            "name=gsm",
            "model.policy=builtin:nano",
            "task.name=file",
            f"task.train_file={TOY}",
            f"task.test_file={TOY}",
            "task.columns.prompt=question",
            'task.prompt_template="Q: {prompt}\\nA:"',  # YAML: quote it
            "rollout.max_new_tokens=8",
            "rollout.prompts_per_step=4",
            "rollout.group_size=2",
            "task.eval_size=4",
            "train.eval_samples=1",
            "train.steps=2",
            "log.tensorboard=false",
        ]
    )
    assert done.returncode == 0, done.stdout + done.stderr
    records = [json.loads(x) for x in (tmp_path / "gsm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "reward/mean" in r] == [1, 2]
    samples = (tmp_path / "gsm" / "samples.jsonl").read_text()
    assert json.loads(samples.splitlines()[0])["prompt"].startswith("Q: ")
    assert json.loads(samples.splitlines()[0])["prompt"].endswith("\nA:")


def test_file_task_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"task.name='file' needs task.train_file"):
        load_config(None, ["task.name=file", f"task.test_file={TOY}"])
    with pytest.raises(
        ConfigError, match=r"task.columns.promt.*did you mean 'task.columns.prompt'"
    ):
        load_config(None, ["task.columns.promt=question"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{oops\n')
    cfg = load_config(
        None,
        [
            "task.name=file",
            f"task.train_file={bad}",
            f"task.test_file={bad}",
            f"output_dir={tmp_path}",
            "rollout.max_new_tokens=16",  # the file task's 256 would fill the 256-token context
        ],
    )
    with pytest.raises(ValueError, match=r"bad\.jsonl, row 2: not valid JSON"):
        Trainer(cfg, progress=False)
    skip = cfg.with_overrides(["task.on_error=skip"])
    assert len(Trainer(skip, progress=False).train_examples) == 1


CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.slow
def test_chat_template_wraps_the_prompts_the_policy_sees(tmp_path):
    from seqrl.models import load_policy, save_policy

    model, tok = load_policy("builtin:nano")
    tok.chat_template = CHAT
    save_policy(model, tok, tmp_path / "chat-model")
    common = [
        f"output_dir={tmp_path}",
        "task.name=file",
        f"task.train_file={TOY}",
        f"task.test_file={TOY}",
        "task.columns.prompt=question",
        "rollout.max_new_tokens=4",
        "rollout.prompts_per_step=4",
        "rollout.group_size=2",
        "task.eval_size=4",
        "train.eval_samples=1",
        "log.tensorboard=false",
    ]
    cfg = load_config(
        None, [*common, f"model.policy={tmp_path / 'chat-model'}", "task.chat_template=true"]
    )
    trainer = Trainer(cfg, progress=False)
    first = trainer.eval_examples[0]
    assert first.prompt.startswith("<|user|>Gus has 4 marbles") and first.prompt.endswith(
        "<|assistant|>"
    )
    assert trainer.task.reference(first) == "13"  # verification still uses the reference
    assert trainer.train_step(1)["reward/mean"] >= 0.0
    # a model without a template: a clear error from the CLI, before any work
    done = train_cli([*common, "model.policy=builtin:nano", "task.chat_template=true"])
    assert done.returncode == 2 and "has no chat template" in done.stderr
