"""Supervised warm start: labels cover only the completion + EOS, and training lowers the loss."""

import torch

from seqrl.models import load_policy
from seqrl.tasks import get_task
from seqrl.train.sft import SFTSettings, encode_sft_batch, run_sft


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
