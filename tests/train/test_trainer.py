"""End-to-end runs of the trainer on the nano model: every preset, resume, NaN handling, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqrl.config import list_presets, load_config
from seqrl.models import load_policy
from seqrl.train import checkpoint as ckpt
from seqrl.train.trainer import Trainer, TrainingAbortedError, stream_seed
from support import kill_when_checkpointed

PRESETS = [name for name, _, _ in list_presets()]


def _run(overrides, steps=2):
    cfg = load_config(None, [*overrides, f"train.steps={steps}"])
    trainer = Trainer(cfg, progress=False)
    return trainer, trainer.fit()


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_end_to_end(preset, fast_overrides):
    overrides = [
        f"preset={preset}",
        *fast_overrides,
        "model.policy=builtin:"
        + ("tiny-moe-addition-noisy" if "moe" in preset else "tiny-addition"),
        "rollout.prompts_per_step=8",
    ]
    if preset == "remax":
        overrides.append("rollout.group_size=1")
    if preset == "ppo":
        overrides.append("critic.warmup_steps=1")  # 2 steps: let the policy update on the 2nd
    trainer, summary = _run(overrides)
    run = Path(summary["run_dir"])
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in (
        "reward/mean",
        "response_len/median",
        "policy/clip_frac",
        "policy/grad_norm",
        "policy/entropy",
        "time/step_s",
        "throughput/tokens_per_s",
    ):
        assert key in steps[-1], key
    assert {r["step"] for r in records if "eval/greedy_acc" in r} == {0, 2}
    assert (run / "config.yaml").exists() and (run / "samples.jsonl").exists()
    assert (run / "final" / "config.json").exists()
    assert ckpt.complete_checkpoints(run / "checkpoints")[-1].name == "step-2"
    # a real update happened: the warm-started policy gets mixed rewards, so weights move
    assert any(r["reward/std"] > 0 for r in steps)
    assert steps[-1]["policy/grad_norm"] > 0
    start, _ = load_policy(trainer.cfg.model.policy)
    moved = [
        not torch.equal(a, b.detach().cpu())
        for a, b in zip(start.parameters(), trainer.model.parameters(), strict=True)
    ]
    assert any(moved)


def _final_weights(run_dir: Path, sub: str = "") -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / sub / "model.safetensors"))


def _cli(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "seqrl", "train", "--no-progress", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


# the critic presets: the critic's weights, AdamW moments and schedule are in the checkpoint too;
# dapo: dynamic sampling draws extra prompts, which must follow from the step number alone
RESUME_CASES = {
    "default": [],
    "sppo": ["preset=sppo", "rollout.group_size=1", "rollout.prompts_per_step=8"],
    "ppo": [
        "preset=ppo",
        "rollout.group_size=1",
        "rollout.prompts_per_step=8",
        "critic.warmup_steps=2",
    ],
    # LoRA adapters on the policy and the critic (their AdamW state covers the adapters only)
    "lora": [
        "preset=sppo",
        "rollout.group_size=1",
        "rollout.prompts_per_step=8",
        "model.lora.r=4",
        "critic.lora=true",
    ],
    "dapo": [
        "preset=dapo",
        "model.policy=builtin:tiny-addition",
        "rollout.gen_batch_prompts=8",
        "rollout.max_gen_batches=3",
        "algo.num_minibatches=4",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_after_kill_is_bit_identical(case, fast_overrides, tmp_path):
    common = [o for o in fast_overrides if not o.startswith("name=")] + RESUME_CASES[case]
    common += ["train.steps=8", "train.checkpoint_every=1", "train.eval_every=3"]
    straight = _cli(*_sets([*common, "name=straight"]))
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    run = tmp_path / "killed"
    kill_when_checkpointed([*common, "name=killed"], run, step=3)
    logged = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) < 8  # really interrupted

    resumed = subprocess.run(
        [sys.executable, "-m", "seqrl", "train", "--no-progress", "--resume", str(run)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    a, b = _final_weights(tmp_path / "straight"), _final_weights(run)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    if case in ("sppo", "ppo", "lora"):
        a, b = _final_weights(tmp_path / "straight", "critic"), _final_weights(run, "critic")
        assert a.keys() == b.keys() and "score.weight" in a
        for key in a:
            assert torch.equal(a[key], b[key]), f"critic {key}"

    def comparable(path):
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        return [
            {k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows
        ]

    assert comparable(run / "metrics.jsonl") == comparable(tmp_path / "straight" / "metrics.jsonl")
    if (
        case == "dapo"
    ):  # the side stream of extra prompts was really used, before and after the kill
        rows = comparable(run / "metrics.jsonl")
        assert any(r.get("sampling/gen_batches", 0) > 1 for r in rows if r["step"] > 3)


def test_nonfinite_updates_are_skipped_then_abort_with_a_usable_checkpoint(fast_overrides):
    cfg = load_config(None, [*fast_overrides, "train.steps=6", "train.max_nonfinite_steps=2"])
    trainer = Trainer(cfg, progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    def poison(module, args, output):  # only the training forward (with grad), not sampling
        if torch.is_grad_enabled():
            output.logits = output.logits * float("nan")
        return output

    trainer.model.register_forward_hook(poison)
    with pytest.raises(TrainingAbortedError, match=r"non-finite.*resume"):
        trainer.fit()
    assert trainer.state.nonfinite_total >= 2
    assert trainer.state.step == 2  # aborted after the 2nd bad step in a row
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed although every update was skipped"
    latest = ckpt.load_latest(trainer.run_dir / "checkpoints")
    assert latest is not None and latest.step == 2
    records = [json.loads(x) for x in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/nonfinite_skipped"] for r in records if "train/nonfinite_skipped" in r] == [
        4.0,
        4.0,
    ]


def test_partial_and_corrupt_checkpoints_are_never_picked(tmp_path):
    model = torch.nn.Linear(2, 2)
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 1, model, {"x": 1}, keep=0)
    ckpt.save_checkpoint(root, 2, model, {"x": 2}, keep=0)
    (root / ".tmp-step-3-123").mkdir()  # a save killed before its rename
    (root / "step-4").mkdir()  # no COMPLETE marker
    (root / "step-4" / "state.pt").write_bytes(b"partial")
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step-1", "step-2"]
    (root / "step-2" / "model.safetensors").write_bytes(b"\x00" * 10)  # corrupted after the fact
    with pytest.warns(UserWarning, match="step-2 is unreadable"):
        latest = ckpt.load_latest(root)
    assert latest.step == 1 and latest.state == {"x": 1}


@pytest.mark.slow
def test_bad_config_key_fails_before_any_work(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "seqrl",
            "train",
            "--set",
            "rollout.group_sise=4",
            "--set",
            f"output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "did you mean 'rollout.group_size'" in out.stderr
    assert not any(tmp_path.iterdir())  # nothing was written


@pytest.mark.slow
def test_resume_of_a_non_run_directory_says_so(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "seqrl", "train", "--resume", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "no config.yaml" in out.stderr


def test_eval_samples_zero_evaluates_greedy_only(fast_overrides):
    _, summary = _run([*fast_overrides, "train.eval_samples=0"], steps=1)
    records = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").open()]
    evals = [r for r in records if "eval/greedy_acc" in r]
    assert [r["step"] for r in evals] == [0, 1]
    assert not any("eval/sampled_acc" in r for r in records)
    assert summary["sampled_acc_start"] is None and summary["sampled_acc_end"] is None


def test_periodic_eval_reports_avg_pass_and_cons_at_k_of_the_same_samples(fast_overrides):
    k = 4
    cfg = load_config(
        None, [*fast_overrides, f"train.eval_samples={k}", "model.policy=builtin:tiny-addition"]
    )
    trainer = Trainer(cfg, progress=False)
    got = trainer.evaluate()
    # the same samples again (each eval example has its own random stream), scored by hand
    examples = trainer.eval_examples
    seeds = [stream_seed(cfg.seed, -1, i) for i in range(len(examples))]
    batch = trainer.sampler.generate(
        [e.prompt for e in examples], group_size=k, temperature=1.0, seeds=seeds
    )
    texts = trainer.tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True)
    avg, any_hit, majority = 0.0, 0.0, 0.0
    for i, e in enumerate(examples):
        answers = [trainer.task.extract_answer(t) for t in texts[i * k : (i + 1) * k]]
        hits = [a == e.answer for a in answers]
        avg += sum(hits) / k
        any_hit += any(hits)
        top = max(answers.count(a) for a in answers)
        majority += next(a for a in answers if answers.count(a) == top) == e.answer
    n = len(examples)
    assert got["eval/sampled_acc"] == pytest.approx(avg / n)
    assert got[f"eval/pass@{k}"] == pytest.approx(any_hit / n)  # unbiased pass@k with n = k
    assert got[f"eval/cons@{k}"] == pytest.approx(majority / n)
    assert 0 < got["eval/sampled_acc"] < got[f"eval/pass@{k}"]  # a test that can tell them apart
