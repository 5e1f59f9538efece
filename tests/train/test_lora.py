"""LoRA via peft: exact no-op at start, only adapters train, merge-on-save round trip, the
reference is the base, critics with adapters, gradient checkpointing changes no gradient."""

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from seqrl.config import ConfigError, load_config
from seqrl.models import load_policy
from seqrl.models.load import checkpointing_active, enable_gradient_checkpointing
from seqrl.models.lora import AdaptersOff, apply_lora, is_lora
from seqrl.rollout import HFSampler
from seqrl.train.step import UpdateSettings, update_policy
from seqrl.train.trainer import Trainer

peft = pytest.importorskip("peft")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(tok, text="123+456="):
    return tok([text], return_tensors="pt", add_special_tokens=False)["input_ids"]


def test_adapters_start_as_an_exact_no_op_and_only_they_train():
    model, tok = load_policy("builtin:nano")
    before = _logits(model, _ids(tok))
    wrapped = apply_lora(model, r=4, alpha=8)
    assert is_lora(wrapped)
    assert torch.equal(_logits(wrapped, _ids(tok)), before)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable if "lora_A" in n} >= {
        "q_proj",
        "v_proj",
        "down_proj",
    }


def test_missing_peft_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    model, _ = load_policy("builtin:nano")
    with pytest.raises(ImportError, match=r"pip install 'seqrl\[peft\]'"):
        apply_lora(model, r=4, alpha=8)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")  # peft's own loader
def test_lora_run_trains_adapters_only_and_saves_a_plain_merged_model(fast_overrides):
    cfg = load_config(
        None,
        [
            *fast_overrides,
            "train.steps=2",
            "model.lora.r=4",
            "optim.lr=1e-2",
            "algo.loss.kl_coef=0.05",
            "model.policy=builtin:tiny-addition-noisy",  # right and wrong samples: a gradient
        ],
    )
    assert load_config(None, [*fast_overrides, "model.lora.target_modules=[q_proj, v_proj]"])
    trainer = Trainer(cfg, progress=False)
    initial, tok = load_policy("builtin:tiny-addition-noisy")
    assert isinstance(trainer.ref_model, AdaptersOff)  # the base model is π_ref: no copy
    trainer.fit()
    model = trainer.model
    ids = _ids(tok)
    base = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p
        for n, p in model.named_parameters()
        if "lora_" not in n
    }
    for name, p in initial.named_parameters():
        assert torch.equal(base[name], p), f"frozen base weight {name} changed"
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().max() > 0 for p in lora_b), "the adapters never trained"
    trained = _logits(model, ids)
    assert not torch.allclose(trained, _logits(initial, ids))
    # π_ref = the base with adapters off, exactly
    assert torch.equal(trainer.ref_model(input_ids=ids).logits, _logits(initial, ids))

    final = trainer.run_dir / "final"
    assert "lora" not in (final / "config.json").read_text().lower()
    plain = AutoModelForCausalLM.from_pretrained(final)  # no peft involved
    assert not is_lora(plain)
    assert torch.allclose(_logits(plain, ids), trained, atol=1e-5)
    reloaded, _ = load_policy(final)
    assert torch.allclose(_logits(reloaded, ids), trained, atol=1e-5)
    adapter = peft.PeftModel.from_pretrained(
        load_policy("builtin:tiny-addition-noisy")[0], final / "adapter"
    )
    assert torch.allclose(_logits(adapter, ids), trained, atol=1e-6)
    assert json.loads((final / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_critic_lora_trains_adapters_and_a_full_value_head(fast_overrides):
    overrides = [
        *fast_overrides,
        "preset=sppo",
        "rollout.group_size=1",
        "rollout.prompts_per_step=8",
    ]
    with pytest.raises(ConfigError, match=r"critic.lora=true.*model.lora.r > 0"):
        load_config(None, [*overrides, "critic.lora=true"])
    cfg = load_config(None, [*overrides, "critic.lora=true", "model.lora.r=4", "train.steps=2"])
    trainer = Trainer(cfg, progress=False)
    critic = trainer.critic.model
    trainable = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any(
        "score" in n and "lora" not in n for n in trainable
    )
    head_before = {n: p.clone() for n, p in critic.named_parameters() if n in trainable}
    trainer.fit()
    changed = [
        n
        for n, p in critic.named_parameters()
        if n in head_before and not torch.equal(p, head_before[n])
    ]
    assert any("score" in n for n in changed)
    assert (trainer.run_dir / "final" / "critic" / "model.safetensors").is_file()
    assert not (trainer.run_dir / "final" / "critic" / "adapter_config.json").exists()


def test_gradient_checkpointing_recomputes_layers_and_changes_no_gradient():
    torch.manual_seed(0)
    model, tok = load_policy("builtin:tiny-addition")
    batch = HFSampler(model, tok, max_new_tokens=5).generate(["12+34=", "500+9="], group_size=4)
    advantages = torch.linspace(-1, 1, 8)
    settings = UpdateSettings(
        loss_name="grpo",
        loss_overrides={"kl_coef": 0.0},
        num_minibatches=1,
        ppo_epochs=1,
        micro_batch_size=8,
        grad_clip=None,
        temperature=1.0,
    )

    def grads(checkpointing: bool):
        m, _ = load_policy("builtin:tiny-addition")
        calls = []
        layer = m.model.layers[0]
        # a submodule's hook: transformers re-runs the layer's forward (not __call__) in backward
        layer.self_attn.q_proj.register_forward_pre_hook(lambda *_: calls.append(1))
        if checkpointing:
            enable_gradient_checkpointing(m)
        opt = torch.optim.SGD(m.parameters(), lr=0.0)
        captured = {}
        opt.step = lambda: captured.update({n: p.grad.clone() for n, p in m.named_parameters()})
        with checkpointing_active(m):
            update_policy(m, opt, batch, advantages, None, None, settings, torch.Generator())
        assert not layer.training and not m.training  # sampling afterwards keeps its KV cache
        return captured, len(calls)

    plain, n_plain = grads(False)
    ckpt, n_ckpt = grads(True)
    assert n_plain == 1 and n_ckpt == 2  # the layer ran again in backward
    for name, g in plain.items():
        assert torch.allclose(ckpt[name], g, rtol=1e-5, atol=1e-7), name
