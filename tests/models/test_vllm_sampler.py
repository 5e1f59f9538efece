"""The vLLM sampler: what can be checked without vLLM (lazy import, errors, weight names),
and a GPU test that runs only where vLLM and CUDA are present (skipped otherwise)."""

import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from seqrl.config import ConfigError, load_config
from seqrl.models import load_policy, save_policy
from seqrl.rollout.vllm import hf_weight_items, import_vllm


@pytest.mark.slow
def test_importing_seqrl_never_imports_vllm():
    code = (
        "import sys, seqrl, seqrl.rollout, seqrl.rollout.vllm, seqrl.train.trainer, seqrl.cli; "
        "print('vllm' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_vllm_says_how_to_install_it():
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'seqrl\[vllm\]'"):
            import_vllm()
    else:
        pytest.skip("vLLM is installed here")


def test_config_rejects_vllm_on_cpu_and_the_trainer_on_a_cpu_only_machine(tmp_path):
    with pytest.raises(ConfigError, match=r"rollout\.engine='vllm' needs a CUDA GPU"):
        load_config(None, ["rollout.engine=vllm", "device=cpu"])
    with pytest.raises(ConfigError, match=r"rollout\.engine"):
        load_config(None, ["rollout.engine=vlm"])
    cfg = load_config(None, ["rollout.engine=vllm", "rollout.vllm.gpu_memory_utilization=0.5"])
    assert cfg.rollout.vllm.gpu_memory_utilization == 0.5
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from seqrl.train.trainer import Trainer

    cfg = load_config(None, ["rollout.engine=vllm", "model.policy=builtin:nano",
                             f"output_dir={tmp_path}", "name=run"])  # fmt: skip
    with pytest.raises((ValueError, ImportError), match=r"vllm|CUDA"):
        Trainer(cfg, progress=False)


class _Wrapped(torch.nn.Module):
    """A container like DDP's: the policy sits under ``.module``."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


@pytest.mark.parametrize("wrap", ["none", "ddp-style", "compiled"])
def test_weight_names_are_the_saved_checkpoints(tmp_path, wrap):
    """The names pushed to the engine are exactly those vLLM loaded at start-up."""
    model, tok = load_policy("builtin:tiny-addition")
    saved = save_policy(model, tok, tmp_path / "policy")
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        on_disk = {k: f.get_tensor(k) for k in f.keys()}
    wrapped = {"none": model, "ddp-style": _Wrapped(model), "compiled": torch.compile(model)}[wrap]
    items = dict(hf_weight_items(wrapped, dtype=torch.bfloat16))
    assert set(items) == set(on_disk)  # lm_head.weight is tied: left out, as save_pretrained does
    for name, tensor in items.items():
        assert tensor.dtype == torch.bfloat16
        torch.testing.assert_close(tensor, on_disk[name].to(torch.bfloat16), rtol=0, atol=0)


def test_vllm_sampler_on_a_gpu(tmp_path):
    """Real engine: μ matches the recomputed π_old, per-prompt seeds are reproducible, and
    weights pushed after a change reach the engine."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'seqrl[vllm]')")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    from seqrl.rollout.vllm import VLLMSampler
    from seqrl.train.step import batch_logprobs

    model, tok = load_policy("builtin:tiny-addition")
    model = model.cuda()
    sampler = VLLMSampler(model, tok, max_new_tokens=8, work_dir=tmp_path, temperature=1.2,
                          gpu_memory_utilization=0.2, enforce_eager=True, dtype="float32")  # fmt: skip
    prompts = ["12+34=", "5+6=", "70+8="]
    batch = sampler.generate(prompts, group_size=4, seeds=[1, 2, 3])
    again = sampler.generate(prompts, group_size=4, seeds=[1, 2, 3])
    assert torch.equal(batch.response_ids, again.response_ids)
    old = batch_logprobs(model, batch, temperature=1.2, micro_batch_size=6)
    mask = batch.response_mask
    torch.testing.assert_close(old[mask], batch.sampler_logprobs[mask], rtol=0, atol=1e-3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sampler.sync_weights(model)
    from seqrl.rollout import HFSampler

    hf = HFSampler(model, tok, max_new_tokens=8).generate(prompts, group_size=1, greedy=True)
    ours = sampler.generate(prompts, group_size=1, greedy=True)
    assert torch.equal(ours.response_ids[:, : hf.response_ids.shape[1]], hf.response_ids)
