"""Supervised warm start: labels cover only the completion + EOS, training lowers the loss,
and the teacher-slip option injects the task's typical mistake at the requested rate."""

import random

import pytest
import torch

from seqrl.models import load_policy
from seqrl.tasks import AdditionTask, Task, get_task
from seqrl.train.sft import SFTSettings, encode_sft_batch, run_sft, sft_targets


def test_labels_cover_completion_and_eos_only():
    _, tok = load_policy("builtin:nano")
    enc = encode_sft_batch(tok, ["1+2=", "10+20="], ["3", "30"])
    # row 0: "1+2=" (4 prompt tokens) then "3", EOS, then 2 pad columns to the width of row 1 (6+3)
    assert (
        enc["labels"][0].tolist()
        == [-100] * 4 + tok("3")["input_ids"] + [tok.eos_token_id] + [-100] * 3
    )
    assert enc["attention_mask"][0].tolist() == [1] * 6 + [0] * 3
    assert enc["labels"][1].tolist()[-3:] == tok("30")["input_ids"] + [tok.eos_token_id]


def test_sft_lowers_the_loss_and_saves_a_loadable_model(tmp_path):
    model, tok = load_policy("builtin:nano")
    task = get_task("addition", digits=2, seed=1)
    enc = encode_sft_batch(
        tok, *zip(*[(e.prompt, task.sft_target(e)) for e in task.examples("test", 64)], strict=True)
    )
    with torch.no_grad():
        before = model(**enc).loss.item()
    run_sft(
        model,
        tok,
        task,
        SFTSettings(
            steps=40,
            batch_size=32,
            lr=3e-3,
            warmup_steps=5,
            eval_size=16,
            train_size=2000,
            log_every=40,
        ),
        out_dir=tmp_path / "warm",
    )
    reloaded, _ = load_policy(str(tmp_path / "warm"))
    with torch.no_grad():
        after = reloaded(**enc).loss.item()
    assert after < 0.8 * before, (before, after)


def test_addition_slip_forgets_the_ones_carry_and_scores_zero():
    task = get_task("addition", digits=3, seed=1)
    carry, plain = task.make_example(117, 225), task.make_example(112, 234)
    assert task.slip_target(carry) == "332"  # 117 + 225 = 342; the ones carry is dropped
    assert task.score("332", carry) == 0.0 and task.score(task.sft_target(carry), carry) == 1.0
    assert task.slip_target(plain) is None  # 2 + 4 does not carry: nothing to forget


def test_sft_targets_slip_at_the_requested_rate_and_only_where_possible():
    task = get_task("addition", digits=3, seed=1)
    examples = task.examples("train", 4000)
    targets = sft_targets(task, examples, random.Random(0), slip_rate=0.7)
    carries = [e for e in examples if task.slip_target(e) is not None]
    slipped = [t != e.answer for t, e in zip(targets, examples, strict=True)]
    # only carry problems can slip; among them about 70% do (binomial sd ≈ 1%)
    assert all(task.slip_target(e) is not None for e, s in zip(examples, slipped, strict=True) if s)
    assert abs(sum(slipped) / len(carries) - 0.7) < 0.05
    # rate 0 draws no random numbers (so batches match a run without the option) and never slips
    rng = random.Random(0)
    assert sft_targets(task, examples, rng) == [e.answer for e in examples]
    assert rng.random() == random.Random(0).random()


def test_teacher_slip_on_a_task_without_slips_is_a_clear_error():
    class NoSlips(AdditionTask):  # the base Task's default: no typical mistake defined
        def slip_target(self, example):
            return Task.slip_target(self, example)

    model, tok = load_policy("builtin:nano")
    with pytest.raises(ValueError, match="defines no teacher slip"):
        run_sft(model, tok, NoSlips(digits=2, seed=1), SFTSettings(steps=1, teacher_slip_rate=0.5))


def test_scratchpad_slip_forgets_the_first_ones_carry_and_carries_on():
    task = get_task("scratchpad", digits=2, operands=3, seed=1)
    ex = task.make_example([17, 25, 36])  # 17+25: ones 7+5 = 12 carry; the slip writes 32
    assert task.slip_target(ex) == "17+25=30+12=32\n32+36=60+8=68\n#68"
    assert task.score(task.slip_target(ex), ex) == 0.0 and ex.answer == "78"
    assert task.slip_target(task.make_example([12, 34, 52])) is None  # no ones carry anywhere


def test_direct_answers_cut_the_scratchpad_and_slip_at_their_own_rate():
    task = get_task("scratchpad", digits=2, operands=3, seed=1)
    ex = task.make_example([17, 25, 36])
    assert task.direct_target(task.sft_target(ex)) == "#78"
    assert task.score("#78", ex) == 1.0 and task.score("#68", ex) == 0.0  # a bare answer scores
    examples = task.examples("train", 4000)
    targets = sft_targets(
        task, examples, random.Random(0), slip_rate=0.0, direct_rate=0.8, direct_slip_rate=0.5
    )
    direct = [t for t in targets if t.startswith("#")]
    worked = [(t, e) for t, e in zip(targets, examples, strict=True) if not t.startswith("#")]
    assert abs(len(direct) / len(examples) - 0.8) < 0.03
    assert all(t == task.sft_target(e) for t, e in worked)  # worked steps stay correct (rate 0)
    pairs = [(t, e) for t, e in zip(targets, examples, strict=True) if t.startswith("#")]
    can_slip = [(t, e) for t, e in pairs if task.slip_target(e) is not None]
    wrong = [t for t, e in pairs if t != f"#{e.answer}"]
    assert all(task.slip_target(e) is not None for t, e in pairs if t != f"#{e.answer}")
    assert abs(len(wrong) / len(can_slip) - 0.5) < 0.05
    model, tok = load_policy("builtin:nano")
    with pytest.raises(ValueError, match="no direct answer form"):
        run_sft(
            model,
            tok,
            get_task("addition", digits=2, seed=1),
            SFTSettings(steps=1, direct_answer_rate=0.5),
        )
