"""The ``seqrl`` command line."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

import seqrl
from seqrl.core import FIPO_PRESETS, POLICY_LOSS_DEFAULTS

app = typer.Typer(
    help="seqrl: RL of language models on verifiable rewards (GSPO, SPPO, FIPO and baselines).",
    no_args_is_help=True,
    add_completion=False,
)

# One line and the paper for every policy-loss preset in seqrl.core.
LOSS_PRESET_INFO: dict[str, tuple[str, str]] = {
    "ppo": (
        "token-level PPO clipped surrogate (pair with GAE and a token critic)",
        "arXiv 1707.06347",
    ),
    "grpo": (
        "group-normalised advantages, per-sequence mean, k3 KL in the loss",
        "arXiv 2402.03300",
    ),
    "dapo": ("clip-higher [0.2, 0.28], token-mean, dual clip 10", "arXiv 2503.14476"),
    "dr_grpo": ("group-centred advantages, token sum / MAX_TOKENS", "arXiv 2503.20783"),
    "gspo": ("sequence-level length-normalised ratio and clipping", "arXiv 2507.18071"),
    "gspo_token": (
        "GSPO with sg[s_i]·π/sg[π] token ratios for per-token advantages",
        "arXiv 2507.18071",
    ),
    "sppo": (
        "token PPO on R − V(prompt) from a scalar BCE critic, one sample per prompt",
        "arXiv 2604.08865",
    ),
    "fipo": ("DAPO with detached future-KL influence weights on the advantage", "arXiv 2603.19835"),
    "rloo": ("leave-one-out baseline, verl's clipped form", "arXiv 2402.14740"),
    "remax": ("greedy-decoding baseline, verl's clipped form", "arXiv 2310.10505"),
}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


@app.command()
def presets() -> None:
    """List the policy-loss presets: what each is, its paper, and its defaults."""
    console = Console(markup=False)  # names such as sg[π] are text, not rich markup
    about = Table(title="seqrl.core.policy_loss presets")
    for column in ("name", "paper", "description"):
        about.add_column(column)
    defaults = Table(title="defaults (explicit keyword arguments override them)")
    for column in ("name", "ratio", "clip [low, high]", "dual c", "aggregation", "KL β"):
        defaults.add_column(column)
    for name, cfg in POLICY_LOSS_DEFAULTS.items():
        description, paper = LOSS_PRESET_INFO[name]
        about.add_row(name, paper, description)
        defaults.add_row(
            name,
            cfg.ratio_level,
            f"[{_fmt(cfg.clip_low)}, {_fmt(cfg.clip_high)}]",
            _fmt(cfg.dual_clip_c),
            cfg.agg,
            _fmt(cfg.kl_coef),
        )
    console.print(about)
    console.print(defaults)
    console.print(
        f"FIPO settings, policy_loss('fipo', **FIPO_PRESETS[key]): {', '.join(FIPO_PRESETS)}"
    )


@app.command()
def version() -> None:
    """Print the seqrl version."""
    typer.echo(seqrl.__version__)


if __name__ == "__main__":
    app()
