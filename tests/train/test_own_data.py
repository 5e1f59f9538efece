"""A user's own task: chat rows, their function as the verifier, per-category accuracy, SFT
encoded as the rollout encodes, and extending a finished run with --resume."""

import json
import textwrap

import pytest
import torch

from seqrl.config import ConfigError, load_config
from seqrl.models import load_policy, save_policy
from seqrl.rollout import HFSampler
from seqrl.train.builders import build_task_data
from seqrl.train.metrics import read_metrics
from seqrl.train.sampling import SamplingSettings, shaped_rewards
from seqrl.train.sft import SFTSettings, encode_sft_batch, run_sft
from seqrl.train.trainer import Trainer

CHATML = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
KINDS = {"first": lambda w: w[0], "last": lambda w: w[-1]}
WORDS = ["owl", "fox", "cat", "dog", "eel", "yak", "ram", "hen", "bee"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A folder with chat rows (a system turn, a kind column), a reward module and a chat model."""
    rows = []
    for kind, pick in KINDS.items():
        for i, a in enumerate(WORDS):
            words = [a, WORDS[(i + 3) % 9], WORDS[(i + 5) % 9]]
            messages = [
                {"role": "system", "content": "One word."},
                {"role": "user", "content": f"{kind}: {' '.join(words)}"},
                {"role": "assistant", "content": pick(words)},
            ]
            rows.append({"messages": messages, "kind": kind})
    (tmp_path / "words.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "own_data_rewards.py").write_text(
        textwrap.dedent(
            """
            def score(completion, example):
                words = completion.split()
                return float(bool(words) and words[0] == example.answer)

            def half(completion, example):
                return 0.5

            def zero(completion, example):
                return 0.0
            """
        )
    )
    model, tok = load_policy("builtin:nano")
    tok.chat_template = CHATML
    save_policy(model, tok, tmp_path / "chat-nano")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _cfg(project, *extra):
    return load_config(
        None,
        [
            f"model.policy={project / 'chat-nano'}",
            "task.name=file",
            f"task.train_file={project / 'words.jsonl'}",
            f"task.test_file={project / 'words.jsonl'}",
            "task.reward=own_data_rewards:score",
            "task.group_by=kind",
            "rollout.prompts_per_step=4",
            "rollout.group_size=2",
            "rollout.max_new_tokens=4",
            "algo.num_minibatches=2",
            "train.eval_samples=0",
            "train.eval_every=0",
            "log.tensorboard=false",
            f"output_dir={project / 'runs'}",
            "name=run",
            *extra,
        ],
    )


def test_a_verifiers_value_is_the_reward_where_it_is_positive():
    s = SamplingSettings(group_size=2, prompts_per_step=2, max_new_tokens=4, incorrect_reward=-1)
    scores = torch.tensor([1.0, 0.25, 0.0, -3.0], dtype=torch.float64)
    got = shaped_rewards(scores > 0, torch.tensor([1, 1, 1, 1]), s, scores=scores)
    assert got.tolist() == [1.0, 0.25, -1.0, -1.0]  # ≤ 0 is wrong: reward.incorrect
    # the built-in verifiers score 1 or 0, so for them it is 1 / reward.incorrect as before
    binary = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    lengths = torch.ones(4, dtype=torch.long)
    assert torch.equal(
        shaped_rewards(binary > 0, lengths, s, scores=binary),
        shaped_rewards(binary > 0, lengths, s),
    )


def test_the_users_function_is_the_reward_of_the_rl_step(project):
    trainer = Trainer(_cfg(project, "task.reward=own_data_rewards:half"), progress=False)
    metrics = trainer.train_step(1)
    assert metrics["reward/mean"] == pytest.approx(0.5)  # graded: its value, not 1
    assert metrics["train/accuracy"] == 1.0  # a positive value counts as right
    zero = Trainer(
        _cfg(project, "task.reward=own_data_rewards:zero", "reward.incorrect=-1", "name=zero")
    )
    assert zero.train_step(1)["reward/mean"] == pytest.approx(-1.0)


def test_chat_rows_train_and_evaluate_per_kind(project):
    trainer = Trainer(_cfg(project, "train.steps=1"), progress=False)
    first = trainer.eval_examples[0]
    assert first.prompt.startswith("<system>One word.\n<user>") and first.prompt.endswith(
        "<assistant>"
    )
    trainer.fit()
    evals = [r for r in read_metrics(trainer.run_dir) if "eval/greedy_acc" in r]
    assert {"eval/greedy_acc/first", "eval/greedy_acc/last"} <= set(evals[0])
    for r in evals:  # the overall accuracy is the size-weighted mean of the groups'
        groups = (r["eval/greedy_acc/first"] + r["eval/greedy_acc/last"]) / 2
        assert r["eval/greedy_acc"] == pytest.approx(groups)
    with pytest.raises(ValueError, match=r"no example has a column 'knid'.*'kind'"):
        Trainer(_cfg(project, "task.group_by=knid", "name=knid"), progress=False)


def test_sft_encodes_each_prompt_exactly_as_the_rollout_does(project):
    cfg = _cfg(project)
    model, tok = load_policy(cfg.model.policy)
    task, train, test = build_task_data(cfg, tok)  # what RL trains and evaluates on
    examples = train[:3]
    enc = encode_sft_batch(
        tok, [e.prompt for e in examples], [task.sft_target(e) for e in examples]
    )
    ids, mask = HFSampler(model, tok, max_new_tokens=4).encode([e.prompt for e in examples])
    for row, e in enumerate(examples):
        prompt_ids = ids[row][mask[row]].tolist()  # the rollout's prompt tokens, unpadded
        n = len(prompt_ids)
        assert enc["input_ids"][row, :n].tolist() == prompt_ids
        assert (enc["labels"][row, :n] == -100).all()  # the prompt is context only
        reply = tok(task.sft_target(e), add_special_tokens=False)["input_ids"]
        labels = enc["labels"][row, n : n + len(reply) + 1].tolist()
        assert labels == [*reply, tok.eos_token_id]  # the reply, then EOS: where sampling stops
    out = run_sft(
        model,
        tok,
        task,
        SFTSettings(steps=2, batch_size=4, log_every=1),
        train_examples=train,
        eval_examples=test,
        max_new_tokens=4,
        group_by="kind",
    )
    assert {"greedy_acc_start", "greedy_acc", "greedy_acc/first", "greedy_acc/last"} <= set(out)


def test_resume_extends_a_finished_run_and_refuses_what_it_cannot_change(project):
    cfg = _cfg(project, "train.steps=2", "train.checkpoint_every=0")
    Trainer(cfg, progress=False).fit()
    run = project / "runs" / "run"
    with pytest.raises(ConfigError, match=r"optim.lr cannot change when resuming"):
        Trainer.resume(run, ["optim.lr=1e-3"], progress=False)
    with pytest.raises(ConfigError, match=r"train.steps=1 is below the step the run has reached"):
        Trainer.resume(run, ["train.steps=1"], progress=False)
    resumed = Trainer.resume(run, ["train.steps=3", "train.eval_every=1"], progress=False)
    resumed.fit()
    steps = [r["step"] for r in read_metrics(run) if "reward/mean" in r]
    assert steps == [1, 2, 3]
    assert load_config(run / "config.yaml").train.steps == 3  # the next resume reads it
