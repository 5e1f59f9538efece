"""Diagnostics of a finished run: ``seqrl diagnose tail-effect RUN_DIR``.

The tail effect (SPPO paper §1, §2.1, Figure 1, App. B; spec §2.10): a token-level PPO critic's
values V(s_t) along correct and incorrect responses stay entangled until the last few tokens.
We sample responses on held-out prompts with the run's final policy, read the run's final token
critic at every response position, and measure where the two families separate.

Definition of "separate" used here (the paper's analysis is only visual). At an aligned position
t, take the responses of each family that reach t (at least ``min_count`` = 2 each) and the 95%
confidence interval of each family's mean value, mean ± 1.96·s/√n (normal approximation, s the
sample standard deviation). The families are *separated at t* when the two intervals do not
overlap. The *separation point* is the earliest t from which they stay separated at every later
position that has enough data: ``first_separated_from_start`` with positions counted from the
first response token (0 = the state after the prompt alone), ``first_separated_from_end`` with
positions counted back from the last token (−1 = the state before the last token). None = never.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

Z95 = 1.959963984540054


def _family_stats(values: Tensor, present: Tensor) -> list[tuple[int, float, float]]:
    """Per aligned position: (n, mean, 95% half-width) of the rows present there."""
    out = []
    for t in range(values.shape[1]):
        v = values[present[:, t], t].double()
        n = v.numel()
        mean = float(v.mean()) if n else math.nan
        half = Z95 * float(v.std()) / math.sqrt(n) if n >= 2 else math.nan
        out.append((n, mean, half))
    return out


def separation(
    values: Tensor, present: Tensor, correct: Tensor, *, min_count: int = 2
) -> tuple[list[bool | None], int | None]:
    """Per-position separation flags (None = too few responses) and the separation point index.

    values, present [B, K] aligned (present = this response has a token at aligned position k);
    correct [B] bool. The separation point is the smallest k separated at k and at every later
    k with data (see the module docstring).
    """
    a = _family_stats(values[correct], present[correct])
    b = _family_stats(values[~correct], present[~correct])
    flags: list[bool | None] = []
    for (na, ma, ha), (nb, mb, hb) in zip(a, b, strict=True):
        if na < min_count or nb < min_count:
            flags.append(None)
        else:
            flags.append(ma - ha > mb + hb or mb - hb > ma + ha)
    point = None
    for k in reversed(range(len(flags))):
        if flags[k] is None:
            continue
        if not flags[k]:
            break
        point = k
    return flags, point


def _align_end(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Right-align each row's valid values: column K−1 = its last token. [B, T] → [B, T]."""
    B, T = values.shape
    lengths = mask.sum(dim=1)
    out = torch.zeros_like(values)
    present = torch.zeros_like(mask)
    for i in range(B):
        n = int(lengths[i])
        out[i, T - n :] = values[i, mask[i]]
        present[i, T - n :] = True
    return out, present


def tail_effect(
    run_dir: str | Path,
    *,
    prompts: int = 64,
    samples: int = 4,
    seed: int = 0,
    out: str | Path | None = None,
) -> dict:
    """Sample, read the token critic, write ``plots/tail_effect.png`` and ``tail_effect.json``."""
    from seqrl.rollout import HFSampler
    from seqrl.train.forward import batch_values
    from seqrl.train.sampling import score_rollout

    run_dir = Path(run_dir)
    cfg, policy, tok, critic = _load_token_critic_run(run_dir)
    task = cfg.task.build()
    examples = task.examples("test", prompts)
    sampler = HFSampler(
        policy,
        tok,
        max_new_tokens=cfg.rollout.max_new_tokens or task.max_new_tokens,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batch = sampler.generate([e.prompt for e in examples], group_size=samples)
    _, rewards = score_rollout(tok, task, batch, examples)
    values = batch_values(critic, batch, "token", micro_batch_size=64).double()  # [B, T]
    mask = batch.response_mask
    correct = rewards > 0
    start_flags, start_point = separation(values, mask, correct)
    end_values, end_present = _align_end(values, mask)
    end_flags, end_point = separation(end_values, end_present, correct)
    T = values.shape[1]
    result = {
        "run_dir": str(run_dir),
        "responses": int(mask.shape[0]),
        "correct": int(correct.sum()),
        "incorrect": int((~correct).sum()),
        "mean_length": float(mask.sum(dim=1).double().mean()),
        "separated_from_start": start_flags,
        "first_separated_from_start": start_point,
        "separated_from_end": dict(zip(range(-T, 0), end_flags, strict=True)),
        "first_separated_from_end": None if end_point is None else end_point - T,
        "definition": "non-overlapping 95% CIs (mean ± 1.96·s/√n, n ≥ 2 per family), "
        "held at every later position with data",
    }
    out = Path(out) if out else run_dir / "plots" / "tail_effect.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    _plot(values, mask, end_values, end_present, correct, result, out)
    result["png"] = str(out)
    result["json"] = str(out.with_suffix(".json"))
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    return result


def _load_token_critic_run(run_dir: Path):
    """(config, policy, tokenizer, token critic) of a finished PPO run, or a clear error."""
    from seqrl.config import load_config
    from seqrl.models import load_policy
    from seqrl.models.critic import build_critic

    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: is it a seqrl run directory?")
    cfg = load_config(str(run_dir / "config.yaml"))
    if cfg.critic.kind != "token":
        raise ValueError(
            f"the tail-effect diagnostic reads a token critic V(s_t), but {run_dir} was trained "
            f"with critic.kind={cfg.critic.kind!r}; train a PPO run (--set preset=ppo) first"
        )
    final = run_dir / "final"
    if not (final / "critic" / "config.json").exists():
        raise FileNotFoundError(
            f"{final}/critic is missing: the run has not finished; "
            f"finish it with `seqrl train --resume {run_dir}`"
        )
    policy, tok = load_policy(final)
    return cfg, policy, tok, build_critic(str(final / "critic"), policy, tok)


def _plot(values, mask, end_values, end_present, correct, result, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = values.shape[1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    start = result["first_separated_from_start"]
    _panel(axes[0], values, mask, list(range(T)), correct, start, "from start")
    end = result["first_separated_from_end"]
    _panel(axes[1], end_values, end_present, list(range(-T, 0)), correct, end, "from end")
    axes[0].set_ylabel("critic value V(s_t)")
    fig.suptitle(
        f"tail effect: {result['correct']} correct / {result['incorrect']} incorrect responses"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _panel(ax, vals, present, xs: list[int], correct, point, name: str) -> None:
    """Every response's V(s_t) (thin), each family's mean and 95% CI, the separation point."""
    for family, colour, label in (
        (correct, "tab:blue", "correct"),
        (~correct, "tab:red", "incorrect"),
    ):
        for i in family.nonzero().flatten().tolist():
            keep = present[i]
            ax.plot(
                [x for x, k in zip(xs, keep.tolist(), strict=True) if k],
                vals[i][keep].tolist(),
                color=colour,
                alpha=0.12,
                linewidth=0.8,
            )
        stats = _family_stats(vals[family], present[family])
        mx = [x for x, (n, _, _) in zip(xs, stats, strict=True) if n >= 2]
        m = [s[1] for s in stats if s[0] >= 2]
        h = [s[2] for s in stats if s[0] >= 2]
        ax.plot(mx, m, color=colour, linewidth=2, label=f"{label} (mean, 95% CI)")
        low = [a - b for a, b in zip(m, h, strict=True)]
        high = [a + b for a, b in zip(m, h, strict=True)]
        ax.fill_between(mx, low, high, color=colour, alpha=0.2)
    if point is not None:
        ax.axvline(point, color="k", linestyle="--", linewidth=1, label=f"separated from {point}")
    ax.set_xlabel(f"response position ({name})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
