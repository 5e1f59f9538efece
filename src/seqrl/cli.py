"""The ``seqrl`` command line: train, sft, eval, presets, plot, compare, diagnose."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

import seqrl

app = typer.Typer(
    help="seqrl: RL of language models on verifiable rewards (GSPO, SPPO, FIPO and baselines).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _quiet_transformers() -> None:
    """seqrl draws its own progress; silence transformers' per-file bars and info logs.

    Through the environment variables transformers and huggingface_hub read when they are
    imported, so that a command that fails early (a config error) never imports them; a value
    the user set is kept.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _fail(message: str) -> None:
    Console(stderr=True, markup=False).print(f"error: {message}", soft_wrap=True)
    raise typer.Exit(code=2)


@app.command()
def train(
    config: Annotated[
        str | None,
        typer.Argument(
            help="YAML run config; none = the embedded default (GSPO, tiny model, addition)"
        ),
    ] = None,
    set_: Annotated[
        list[str], typer.Option("--set", help="override a config key: --set train.steps=20")
    ] = [],  # noqa: B006
    resume: Annotated[
        Path | None, typer.Option(help="continue the run in this run directory")
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="delete an existing run directory of the same name first "
            "(refused while a live run holds it)",
        ),
    ] = False,
    progress: Annotated[bool, typer.Option(help="show the progress bar")] = True,
) -> None:
    """Train a policy with RL. With no argument: the embedded CPU demo.

    Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and exits (130 / 143);
    a second one exits at once. Continue with --resume RUN_DIR.
    """
    from seqrl.config import ConfigError, load_config, validate_warnings

    console = Console()
    cfg = None
    if resume is not None:
        if config or set_:
            _fail("--resume continues a run with its saved config.yaml; drop CONFIG and --set")
        if overwrite:
            _fail("--overwrite starts a run from scratch, --resume continues it: give one")
    else:  # a bad config fails here, before the trainer, models and transformers are imported
        try:
            cfg = load_config(config, set_)
        except ConfigError as err:
            _fail(str(err))
        for warning in validate_warnings(cfg):
            console.print(f"[yellow]warning:[/yellow] {warning}")

    from seqrl.tasks.sandbox import SandboxUnavailableError
    from seqrl.train.checkpoint import complete_checkpoints
    from seqrl.train.trainer import (
        RunDirError,
        Trainer,
        TrainingAbortedError,
        TrainingInterruptedError,
    )

    trainer = None
    try:
        try:
            if resume is not None:
                trainer = Trainer.resume(resume, console=console, progress=progress)
            else:
                trainer = Trainer(cfg, console=console, progress=progress, overwrite=overwrite)
        except (ValueError, SandboxUnavailableError) as err:  # bad data rows, no sandbox, ...
            _fail(str(err))
        trainer.fit()
    except TrainingInterruptedError as err:
        if os.environ.get("RANK", "0") == "0":
            Console(stderr=True, markup=False).print(str(err), soft_wrap=True)
        raise typer.Exit(code=err.exit_code) from None
    except KeyboardInterrupt:  # a second Ctrl-C, or one during set-up
        if trainer is None:
            message = "interrupted during set-up; nothing was trained"
        else:
            saved = complete_checkpoints(trainer.run_dir / "checkpoints")
            message = (
                f"stopped at once; the last complete checkpoint is {saved[-1]}\n"
                f"resume with: seqrl train --resume {trainer.run_dir}"
                if saved
                else f"stopped at once; {trainer.run_dir} has no checkpoint yet"
            )
        Console(stderr=True, markup=False).print(message, soft_wrap=True)
        raise typer.Exit(code=130) from None
    except (ConfigError, FileNotFoundError, RunDirError, TrainingAbortedError) as err:
        _fail(str(err))
    finally:
        from seqrl.train.dist import cleanup

        cleanup()  # the torchrun process group, if this run started one


@app.command()
def sft(
    out: Annotated[Path, typer.Option(help="where to save the warm-started model (HF format)")],
    model: Annotated[
        str, typer.Option(help="starting model: builtin:tiny or a local HF directory")
    ] = "builtin:tiny",
    task: Annotated[str, typer.Option(help="addition | scratchpad")] = "addition",
    digits: Annotated[int, typer.Option(help="operand digits")] = 3,
    operands: Annotated[int, typer.Option(help="scratchpad: operands per problem")] = 4,
    task_seed: Annotated[int, typer.Option(help="seed of the task's problem set")] = 1234,
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 300,
    batch_size: Annotated[int, typer.Option()] = 64,
    lr: Annotated[float, typer.Option()] = 1e-3,
    seed: Annotated[int, typer.Option()] = 0,
    teacher_slip_rate: Annotated[
        float,
        typer.Option(
            help="probability that a demonstration is the task's typical mistake instead "
            "(addition: the carry out of the ones column is forgotten)"
        ),
    ] = 0.0,
) -> None:
    """Supervised warm start on a built-in task (makes the shipped builtin:tiny-addition*)."""
    from seqrl.models import load_policy
    from seqrl.tasks import get_task
    from seqrl.train.sft import SFTSettings, run_sft

    kwargs = {"digits": digits, "seed": task_seed} | (
        {"operands": operands} if task == "scratchpad" else {}
    )
    try:
        the_task = get_task(task, **kwargs)
        policy, tokenizer = load_policy(model)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    settings = SFTSettings(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        teacher_slip_rate=teacher_slip_rate,
    )
    try:
        run_sft(policy, tokenizer, the_task, settings, out_dir=out)
    except ValueError as err:
        _fail(str(err))


@app.command("make-model")
def make_model(
    out: Annotated[Path, typer.Argument(help="directory to write (Hugging Face format)")],
    text: Annotated[
        list[Path],
        typer.Option(help="text to train the tokenizer on: .jsonl (every string field) or text"),
    ],
    architecture: Annotated[str, typer.Option(help="llama | qwen2 | mistral")] = "llama",
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size (at most)")] = 512,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """A small random stand-in for a pretrained model: BPE tokenizer on your text + HF model."""
    from seqrl.models.pretrained import write_stand_in

    def lines(path: Path):
        if path.suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line) if line.strip() else {}
                yield from (v for v in row.values() if isinstance(v, str))
        else:
            yield from path.read_text(encoding="utf-8").splitlines()

    try:
        texts = [t for path in text for t in lines(path)]
        write_stand_in(out, texts, architecture=architecture, vocab_size=vocab_size, seed=seed)
    except (OSError, ValueError) as err:
        _fail(str(err))
    Console().print(f"wrote {out} ({architecture}); use it as model.policy={out}")


@app.command()
def presets(
    markdown: Annotated[
        bool, typer.Option("--markdown", help="print the two tables as markdown, for the docs")
    ] = False,
) -> None:
    """List the run presets and the policy-loss presets, with their papers and defaults."""
    from seqrl.config import list_presets
    from seqrl.core import FIPO_PRESETS, POLICY_LOSSES

    runs = [(name, paper, summary) for name, summary, paper in list_presets()]
    losses = [(name, p.paper, p.summary) for name, p in POLICY_LOSSES.items()]
    if markdown:
        typer.echo(_markdown_table(("run preset", "paper", "summary"), runs))
        typer.echo()
        typer.echo(_markdown_table(("policy loss", "paper", "summary"), losses))
        return
    console = Console(markup=False)  # names such as sg[π] are text, not rich markup
    title = "run presets (seqrl train --set preset=NAME, or `preset: NAME` in a YAML)"
    console.print(_table(title, ("name", "paper", "description"), runs))
    console.print(
        _table("seqrl.core.policy_loss presets", ("name", "paper", "description"), losses)
    )
    defaults = [
        (
            name,
            p.defaults.ratio_level,
            f"[{_fmt(p.defaults.clip_low)}, {_fmt(p.defaults.clip_high)}]",
            _fmt(p.defaults.dual_clip_c),
            p.defaults.agg,
            _fmt(p.defaults.kl_coef),
        )
        for name, p in POLICY_LOSSES.items()
    ]
    columns = ("name", "ratio", "clip [low, high]", "dual c", "aggregation", "KL β")
    title = "policy_loss defaults (explicit keyword arguments override them)"
    console.print(_table(title, columns, defaults))
    console.print(
        f"FIPO settings, policy_loss('fipo', **FIPO_PRESETS[key]): {', '.join(FIPO_PRESETS)}"
    )


def _table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> Table:
    table = Table(title=title)
    for i, column in enumerate(columns):
        # names stay whole in a narrow terminal; long words elsewhere fold rather than truncate
        table.add_column(column, no_wrap=i == 0, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def _markdown_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A markdown table; the first column (a name) in backticks."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, *rest in rows:
        cells = [f"`{name}`", *(text.replace("|", "\\|") for text in rest)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@app.command()
def plot(run_dir: Annotated[Path, typer.Argument(help="a run directory (runs/<name>)")]) -> None:
    """Draw reward, accuracy, length and clip-fraction curves into RUN_DIR/plots/."""
    from seqrl.train.plots import plot_run

    try:
        written = plot_run(run_dir)
    except (FileNotFoundError, ValueError) as err:  # no run there, a corrupt metrics line
        _fail(str(err))
    for path in written:
        typer.echo(str(path))


@app.command("eval")
def eval_(
    model: Annotated[
        str, typer.Argument(help="builtin:NAME, a run's final/ dir or any HF model dir")
    ],
    data: Annotated[
        Path | None, typer.Option(help="a .jsonl/.csv/.parquet file (or saved datasets dir)")
    ] = None,
    task: Annotated[
        str | None, typer.Option(help="a built-in task instead of --data (its held-out split)")
    ] = None,
    k: Annotated[int, typer.Option(min=1, help="samples per item (avg@k, pass@k, cons@k)")] = 16,
    limit: Annotated[
        int | None,
        typer.Option(min=1, help="evaluate the first N items only (all of them if fewer)"),
    ] = None,
    column: Annotated[
        list[str] | None, typer.Option(help="column mapping FIELD=NAME, e.g. prompt=question")
    ] = None,
    reward: Annotated[str, typer.Option(help="math | code | exact (with --data)")] = "math",
    template: Annotated[str, typer.Option(help="prompt template with {prompt}")] = "{prompt}",
    chat: Annotated[
        bool, typer.Option(help="wrap prompts in the tokenizer's chat template")
    ] = False,
    temperature: Annotated[float, typer.Option()] = 1.0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    max_new_tokens: Annotated[int | None, typer.Option(help="default: the task's budget")] = None,
    batch_items: Annotated[int, typer.Option(help="items per generate call")] = 16,
    out: Annotated[Path | None, typer.Option(help="per-item results (JSONL)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    on_error: Annotated[
        str, typer.Option(help="a malformed or too long row of --data: raise | skip (and count)")
    ] = "raise",
    max_prompt_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="longest prompt; default: the model's context − the budget"),
    ] = None,
) -> None:
    """avg@k, unbiased pass@k and cons@k with 95% bootstrap intervals, per-item JSONL.

    Every prompt must leave room for --max-new-tokens in the model's context (or fit in
    --max-prompt-tokens); a longer one is an error naming its file and row (or, with
    --on-error skip, is left out and counted).
    """
    import dataclasses
    import json

    import torch
    from rich.progress import Progress

    from seqrl.evaluation import evaluate_samples
    from seqrl.models import chat_prompts, load_policy
    from seqrl.rollout import HFSampler
    from seqrl.tasks import get_task
    from seqrl.tasks.files import DataError
    from seqrl.tasks.filetask import FileTask
    from seqrl.tasks.lengths import check_prompt_lengths, context_length, prompt_limit
    from seqrl.tasks.sandbox import SandboxUnavailableError

    if (data is None) == (task is None):
        _fail("give exactly one of --data FILE or --task NAME")
    if on_error not in ("raise", "skip"):
        _fail(f"--on-error must be raise or skip, got {on_error!r}")
    err_console = Console(stderr=True, markup=False, highlight=False)
    try:
        if data is not None:
            columns = dict(c.split("=", 1) for c in column or [])
            the_task = FileTask(
                test=data,
                columns=columns,
                reward=reward,
                prompt_template=template,
                max_new_tokens=max_new_tokens or 256,
                on_error=on_error,
            )
            items = the_task.examples("test")  # all usable rows; --limit applies after checks
        else:
            the_task = get_task(task)
            items = the_task.examples("test", min(limit or 200, the_task.max_examples("test")))
        policy, tokenizer = load_policy(model)
    except (ValueError, DataError, FileNotFoundError, SandboxUnavailableError) as err:
        _fail(str(err).replace("pass on_error='skip'", "pass --on-error skip"))
    prompts = [e.prompt for e in items]
    if chat:
        try:
            prompts = chat_prompts(tokenizer, prompts)
        except ValueError as err:
            _fail(f"{model}: {err}")
    budget = max_new_tokens or the_task.max_new_tokens
    max_prompt, why = prompt_limit(
        max_prompt_tokens,
        context_length(policy),
        max_new_tokens=budget,
        setting_name="--max-prompt-tokens",
    )
    if max_prompt is not None:
        shown = [dataclasses.replace(e, prompt=p) for e, p in zip(items, prompts, strict=True)]
        try:
            kept, problems = check_prompt_lengths(
                shown,
                tokenizer,
                max_prompt,
                why=why,
                split="test",
                on_error=on_error if data is not None else "raise",
                fix="shorten or drop the row, or pass --on-error skip to leave such rows out"
                if data is not None
                else "lower --max-new-tokens",
            )
        except DataError as err:
            _fail(str(err))
        if problems:
            err_console.print(f"note: {len(problems)} too long rows skipped; first: {problems[0]}")
        fits = {id(e) for e in kept}
        items = [e for e, s in zip(items, shown, strict=True) if id(s) in fits]
        prompts = [s.prompt for s in shown if id(s) in fits]
    if data is not None and the_task.reports["test"].skipped:
        r = the_task.reports["test"]
        err_console.print(f"note: {r.skipped} malformed rows skipped; first: {r.first_problems[0]}")
    if limit is not None and limit > len(items):
        err_console.print(
            f"note: --limit {limit} is more than the {len(items)} items: all are used"
        )
    items, prompts = items[:limit], prompts[:limit]
    if not items:
        _fail("no item left to evaluate")
    torch.manual_seed(seed)
    sampler = HFSampler(
        policy,
        tokenizer,
        max_new_tokens=max_new_tokens or the_task.max_new_tokens,
        temperature=temperature,
        top_p=top_p,
    )
    completions: list[list[str]] = []
    with Progress(console=Console(stderr=True)) as progress:
        bar = progress.add_task("sampling", total=len(items))
        for s in range(0, len(items), batch_items):
            batch = sampler.generate(prompts[s : s + batch_items], group_size=k)
            texts = tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True)
            completions += [texts[i : i + k] for i in range(0, len(texts), k)]
            progress.advance(bar, len(texts) // k)
    ks = sorted({1, k} | {x for x in (4, 8, 16, 32) if x < k})
    records, summary = evaluate_samples(the_task, items, completions, ks=ks)
    if out is not None:
        with out.open("w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    table = Table(title=f"{model}: {len(items)} items × {k} samples")
    for col in ("metric", "value", "95% CI"):
        table.add_column(col)
    for key, value in summary.items():
        if not key.endswith(("_ci_low", "_ci_high")):
            ci = f"[{summary[key + '_ci_low']:.3f}, {summary[key + '_ci_high']:.3f}]"
            table.add_row(key, f"{value:.3f}", ci)
    Console().print(table)
    if out is not None:
        Console().print(f"per-item results: {out}")


diagnose_app = typer.Typer(help="Diagnostics of a finished run.", no_args_is_help=True)
app.add_typer(diagnose_app, name="diagnose")


@diagnose_app.command("tail-effect")
def tail_effect(
    run_dir: Annotated[Path, typer.Argument(help="a finished PPO run (critic.kind=token)")],
    prompts: Annotated[int, typer.Option(help="held-out prompts to sample")] = 64,
    samples: Annotated[int, typer.Option(help="responses per prompt")] = 4,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="PNG path; default RUN_DIR/plots/tail_effect.png")
    ] = None,
) -> None:
    """Plot the token critic's V(s_t) along correct vs incorrect responses (SPPO §2.10)."""
    from seqrl.train.diagnose import tail_effect as run_tail_effect

    try:
        r = run_tail_effect(run_dir, prompts=prompts, samples=samples, seed=seed, out=out)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))

    def where(point):
        return (
            "never (the 95% CIs overlap at the last position with data)"
            if point is None
            else str(point)
        )

    typer.echo(
        f"{r['responses']} responses ({r['correct']} correct, {r['incorrect']} incorrect), "
        f"mean length {r['mean_length']:.1f} tokens"
    )
    typer.echo(f"separated from position (from start): {where(r['first_separated_from_start'])}")
    typer.echo(f"separated from position (from end):   {where(r['first_separated_from_end'])}")
    typer.echo(r["png"])
    typer.echo(r["json"])


@app.command()
def compare(
    arms: Annotated[
        list[str],
        typer.Argument(
            help="arms: [LABEL:]SPEC, SPEC = a YAML file or preset and/or key=value overrides "
            "in one quoted argument, e.g. 'grpo:preset=grpo algo.loss.kl_coef=0'"
        ),
    ],
    seeds: Annotated[
        list[int] | None, typer.Option(help="seeds: --seeds 0 1 2 (default 0 1 2)")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="train.steps of every run")] = None,
    wall_clock: Annotated[
        float | None,
        typer.Option(help="training-time budget per run in seconds (train.time_limit_s)"),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(help="accuracy target: absolute (0.8) or a gain over the start (+0.05)"),
    ] = None,
    out: Annotated[Path, typer.Option(help="the report directory")] = Path("compare"),
    set_: Annotated[
        list[str], typer.Option("--set", help="an override every arm gets: --set optim.lr=1e-5")
    ] = [],  # noqa: B006
    metric: Annotated[str, typer.Option(help="the accuracy metric")] = "eval/sampled_acc",
    threads: Annotated[int, typer.Option(min=1, help="CPU threads of each run")] = 1,
) -> None:
    """Run every arm for every seed (one process each) and write a comparison report."""
    from seqrl.compare import CompareError, compare
    from seqrl.config import ConfigError

    # `--seeds 0 1 2`: click gives the option its first value and the rest arrive as arguments
    extra = [int(a) for a in arms if a.isdigit()]
    arms = [a for a in arms if not a.isdigit()]
    seeds = [*(seeds or []), *extra] or [0, 1, 2]
    try:
        report = compare(
            arms,
            seeds,
            out=out,
            steps=steps,
            wall_clock=wall_clock,
            target=target,
            common=set_,
            metric=metric,
            threads=threads,
            echo=typer.echo,
        )
    except (CompareError, ConfigError) as err:
        _fail(str(err))
    typer.echo((out / "report.md").read_text())
    for path in report.files:
        typer.echo(str(path))


@app.command()
def version() -> None:
    """Print the seqrl version."""
    typer.echo(seqrl.__version__)


if __name__ == "__main__":
    app()
