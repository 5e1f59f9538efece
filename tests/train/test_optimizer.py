"""The policy's and critics' AdamW: torch's fused kernel where it applies, the same update."""

import copy

import torch

from seqrl.config.schema import OptimConfig
from seqrl.models import load_policy
from seqrl.train.builders import build_optimizer, fused_adamw_applies


def test_the_optimizer_is_fused_adamw_and_steps_as_the_reference_adamw():
    model, _ = load_policy("builtin:nano")
    settings = OptimConfig(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6)
    fused_model, ref_model = copy.deepcopy(model), copy.deepcopy(model)
    fused = build_optimizer(fused_model, settings)
    ref = torch.optim.AdamW(
        ref_model.parameters(),
        lr=1e-2,
        weight_decay=0.1,
        betas=(0.8, 0.95),
        eps=1e-6,
        foreach=False,
    )
    assert fused.defaults["fused"] and not ref.defaults["fused"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        for p, q in zip(fused_model.parameters(), ref_model.parameters(), strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        fused.step()
        ref.step()
    moved = 0.0
    for p, q, p0 in zip(
        fused_model.parameters(), ref_model.parameters(), model.parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # float rounding only
        moved = max(moved, (p - p0).abs().max().item())
    assert moved > 1e-2  # five steps of lr 1e-2 really moved the weights


def test_fused_is_off_where_the_kernel_cannot_take_the_parameters():
    cpu = [
        torch.nn.Parameter(torch.zeros(3)),
        torch.nn.Parameter(torch.zeros(2, dtype=torch.float64)),
    ]
    assert fused_adamw_applies(cpu)
    assert not fused_adamw_applies([torch.nn.Parameter(torch.zeros(3, device="meta"))])
    assert not fused_adamw_applies([])
