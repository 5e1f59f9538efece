"""The ``seqrl`` command line: train, sft, eval, presets, plot, compare, diagnose."""

from __future__ import annotations

import json
import os
import sys
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
    """seqrl draws its own progress; silence transformers' per-file bars and info logs, and put
    the working directory on the import path as ``python -m`` does, so that a reward function
    ``my_rewards:score`` in ./my_rewards.py imports without PYTHONPATH=.

    Through the environment variables transformers and huggingface_hub read when they are
    imported, so that a command that fails early (a config error) never imports them; a value
    the user set is kept.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _fmt(value) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _fail(message: str) -> None:
    Console(stderr=True, markup=False).print(f"error: {message}", soft_wrap=True)
    raise typer.Exit(code=2)


THREADS_HELP = (
    "CPU threads for torch; default: OMP_NUM_THREADS, else the cores this process may use "
    "(at most 8). Use 1 when other jobs share the machine"
)


def _threads(threads: int | None) -> int:
    """Set torch's CPU threads and print the start-up line (``seqrl.threads``)."""
    from seqrl.threads import set_threads, threads_line

    n, why = set_threads(threads)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for the job
        Console(stderr=True, markup=False).print(threads_line(n, why))
    return n


@app.command()
def train(
    config: Annotated[
        str | None,
        typer.Argument(
            help="YAML run config; none = the embedded default (GSPO, tiny model, addition)"
        ),
    ] = None,
    set_: Annotated[
        list[str],
        typer.Option(
            "--set",
            help="override a config key: --set train.steps=20 (quote values with {}, [] or "
            """': ' for YAML: --set 'task.prompt_template="Q: {prompt}"')""",
        ),
    ] = [],  # noqa: B006
    resume: Annotated[
        Path | None,
        typer.Option(
            help="continue the run in this run directory (--set may change its steps, "
            "evaluation, checkpoint and logging settings)"
        ),
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
    threads: Annotated[
        int | None, typer.Option(help=THREADS_HELP + " (the `threads` config key)", min=1)
    ] = None,
) -> None:
    """Train a policy with RL. With no argument: the embedded CPU demo.

    Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and exits (130 / 143);
    a second one exits at once. Continue with --resume RUN_DIR (--set may then change its
    steps, evaluation, checkpoint and logging).
    """
    from seqrl.config import ConfigError, load_config, resume_config, validate_warnings

    console = Console()
    overrides = [*set_, *([f"threads={threads}"] if threads is not None else [])]
    # a bad config fails here, before the trainer, models and transformers are imported
    try:
        if resume is not None:
            if config:
                _fail(
                    "--resume continues a run with its saved config.yaml; drop CONFIG "
                    "(--set may still change its steps, evaluation, checkpoint and logging)"
                )
            if overwrite:
                _fail("--overwrite starts a run from scratch, --resume continues it: give one")
            cfg = resume_config(resume, overrides)
            if any(o.strip().startswith("train.steps") for o in overrides) and "cosine" in (
                cfg.optim.schedule,
                cfg.critic.schedule,
            ):
                console.print(
                    "[yellow]warning:[/yellow] the cosine learning-rate schedule now decays "
                    f"over train.steps={cfg.train.steps}: the remaining steps follow the new "
                    "curve, so the learning rate changes at the resumed step"
                )
        else:
            cfg = load_config(config, overrides)
            for warning in validate_warnings(cfg):
                console.print(f"[yellow]warning:[/yellow] {warning}")
    except (ConfigError, FileNotFoundError) as err:
        _fail(str(err))
    _threads(cfg.threads)

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
                trainer = Trainer.resume(resume, overrides, console=console, progress=progress)
            else:
                trainer = Trainer(cfg, console=console, progress=progress, overwrite=overwrite)
        except (ValueError, SandboxUnavailableError) as err:  # bad data rows, no sandbox, ...
            _fail(str(err))
        trainer.fit()
        if trainer.dist.is_main and trainer.cfg.hub.repo_id:
            from seqrl.hub import HubPushError, push_run

            try:
                push_run(trainer.run_dir, trainer.cfg.hub, console=console)
            except HubPushError as err:
                _fail(str(err))
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
    config: Annotated[
        str | None,
        typer.Argument(
            help="a run config (YAML or preset) whose model and task settings to use, as "
            "`seqrl train` reads them; none = the built-in task from the options below"
        ),
    ] = None,
    set_: Annotated[
        list[str],
        typer.Option(
            "--set", help="override a config key, as for train: --set task.train_file=d.jsonl"
        ),
    ] = [],  # noqa: B006
    model: Annotated[
        str | None,
        typer.Option(help="starting model (model.policy); default builtin:tiny, or the config's"),
    ] = None,
    task: Annotated[
        str | None, typer.Option(help="addition | scratchpad | file (task.name)")
    ] = None,
    digits: Annotated[int | None, typer.Option(help="operand digits (task.digits)")] = None,
    operands: Annotated[
        int | None, typer.Option(help="scratchpad: operands per problem (task.operands)")
    ] = None,
    task_seed: Annotated[
        int | None, typer.Option(help="seed of the task's problem set (task.seed)")
    ] = None,
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 300,
    batch_size: Annotated[int, typer.Option()] = 64,
    lr: Annotated[float, typer.Option()] = 1e-3,
    seed: Annotated[int | None, typer.Option(help="default: the config's seed (0)")] = None,
    teacher_slip_rate: Annotated[
        float,
        typer.Option(
            help="probability that a demonstration is the task's typical mistake instead "
            "(addition: the carry out of the ones column is forgotten)"
        ),
    ] = 0.0,
    direct_answer_rate: Annotated[
        float,
        typer.Option(
            help="probability that a demonstration is only the final answer, without the worked "
            "steps (scratchpad: '#102')"
        ),
    ] = 0.0,
    direct_slip_rate: Annotated[
        float,
        typer.Option(
            help="probability that such a direct answer is the slip's (a forgotten carry)"
        ),
    ] = 0.0,
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP, min=1)] = None,
) -> None:
    """Supervised warm start, on a built-in task or your data (the same task settings as train).

    Prompts are encoded exactly as the rollout encodes them (template, chat, no added BOS), the
    reply is the row's completion (or answer) followed by EOS. Held-out greedy accuracy is
    printed before and after.
    """
    from seqrl.config import ConfigError, load_config
    from seqrl.train.sft import SFTSettings, sft_from_config

    flags = {
        "model.policy": model,
        "task.name": task,
        "task.digits": digits,
        "task.operands": operands,
        "task.seed": task_seed,
    }
    overrides = [f"{key}={json.dumps(value)}" for key, value in flags.items() if value is not None]
    if config is None and model is None and not any(o.startswith("model.policy=") for o in set_):
        overrides.insert(0, "model.policy=builtin:tiny")  # a random model to warm-start
    try:
        cfg = load_config(config, [*overrides, *set_])
    except ConfigError as err:
        _fail(str(err))
    _threads(threads if threads is not None else cfg.threads)
    settings = SFTSettings(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=cfg.seed if seed is None else seed,
        teacher_slip_rate=teacher_slip_rate,
        direct_answer_rate=direct_answer_rate,
        direct_slip_rate=direct_slip_rate,
    )
    try:
        sft_from_config(cfg, settings, out_dir=out)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))


@app.command("make-model")
def make_model(
    out: Annotated[Path, typer.Argument(help="directory to write (Hugging Face format)")],
    text: Annotated[
        list[Path],
        typer.Option(help="text to train the tokenizer on: .jsonl (every string field) or text"),
    ],
    architecture: Annotated[str, typer.Option(help="llama | qwen2 | mistral")] = "llama",
    size: Annotated[
        str, typer.Option(help="tiny (64 wide, 2 layers) | small (128, 4) | base (256, 6)")
    ] = "tiny",
    hidden: Annotated[int | None, typer.Option(help="hidden size (overrides --size)")] = None,
    layers: Annotated[int | None, typer.Option(help="decoder layers (overrides --size)")] = None,
    heads: Annotated[int | None, typer.Option(help="attention heads (overrides --size)")] = None,
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size (at most)")] = 512,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP, min=1)] = None,
) -> None:
    """A small random stand-in for a pretrained model: BPE tokenizer on your text + HF model."""
    from seqrl.models.pretrained import SIZES, write_stand_in

    if size not in SIZES:
        _fail(f"unknown --size {size!r}; choose one of {', '.join(SIZES)} (or --hidden/--layers)")
    shape = dict(zip(("hidden_size", "layers", "heads"), SIZES[size], strict=True))
    given = {"hidden_size": hidden, "layers": layers, "heads": heads}
    shape |= {key: value for key, value in given.items() if value is not None}
    _threads(threads)

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)

    def lines(path: Path):
        if path.suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                yield from strings(json.loads(line) if line.strip() else {})
        else:
            yield from path.read_text(encoding="utf-8").splitlines()

    try:
        texts = [t for path in text for t in lines(path)]
        write_stand_in(
            out, texts, architecture=architecture, vocab_size=vocab_size, seed=seed, **shape
        )
    except (OSError, ValueError) as err:
        _fail(str(err))
    what = f"{architecture}, hidden {shape['hidden_size']}, {shape['layers']} layers"
    Console().print(f"wrote {out} ({what}); use it as model.policy={out}")


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
def plot(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="one run directory (runs/<name>), or several to overlay")
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="where to write the PNGs; default RUN_DIR/plots, or ./plots for several"),
    ] = None,
) -> None:
    """Draw reward, accuracy, length and clip-fraction curves; several runs are overlaid."""
    from seqrl.train.plots import plot_run, plot_runs

    try:
        if len(run_dirs) == 1 and out is None:
            written = plot_run(run_dirs[0])
        else:
            written = plot_runs(run_dirs, out or Path("plots"))
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
        str | None,
        typer.Option(help="a .jsonl/.csv/.parquet file, a datasets directory or a Hub dataset id"),
    ] = None,
    task: Annotated[
        str | None, typer.Option(help="a built-in task instead of --data (its held-out split)")
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            help="a run config (e.g. RUN/config.yaml): its held-out problems, columns, "
            "template, chat and reward, exactly as training evaluated them"
        ),
    ] = None,
    k: Annotated[int, typer.Option(min=1, help="samples per item (avg@k, pass@k, cons@k)")] = 16,
    limit: Annotated[
        int | None, typer.Option(min=1, help="evaluate the first N items only")
    ] = None,
    column: Annotated[
        list[str] | None, typer.Option(help="column mapping FIELD=NAME, e.g. prompt=question")
    ] = None,
    reward: Annotated[
        str, typer.Option(help="math | code | exact | module:function (with --data)")
    ] = "math",
    template: Annotated[str, typer.Option(help="prompt template with {prompt}")] = "{prompt}",
    chat: Annotated[
        bool, typer.Option(help="wrap prompts in the tokenizer's chat template")
    ] = False,
    split: Annotated[
        str | None, typer.Option(help="the split of a dataset with several (default: test)")
    ] = None,
    group_by: Annotated[
        str | None, typer.Option(help="a column: accuracies per value of it, e.g. kind")
    ] = None,
    temperature: Annotated[float, typer.Option()] = 1.0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    max_new_tokens: Annotated[int | None, typer.Option(help="default: the task's budget")] = None,
    batch_items: Annotated[int, typer.Option(help="items per generate call")] = 16,
    out: Annotated[Path | None, typer.Option(help="per-item results (JSONL)")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP, min=1)] = None,
    on_error: Annotated[
        str, typer.Option(help="a malformed or too long row of --data: raise | skip (and count)")
    ] = "raise",
    max_prompt_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="longest prompt; default: the model's context − the budget"),
    ] = None,
) -> None:
    """Greedy accuracy, and avg@k, unbiased pass@k and cons@k over k samples, with 95% bootstrap
    intervals; per-item JSONL (the prompt exactly as the model saw it).

    Every prompt must leave room for --max-new-tokens in the model's context (or fit in
    --max-prompt-tokens); a longer one is an error naming its file and row (or, with
    --on-error skip, is left out and counted).
    """
    from rich.progress import Progress

    from seqrl.config import ConfigError, load_config
    from seqrl.evaluation import check_group_by, evaluate_policy
    from seqrl.models import load_policy
    from seqrl.tasks import get_task
    from seqrl.tasks.files import DataError
    from seqrl.tasks.filetask import FileTask
    from seqrl.tasks.prompts import rendered
    from seqrl.tasks.sandbox import SandboxUnavailableError

    if sum(x is not None for x in (data, task, config)) != 1:
        _fail("give exactly one of --data FILE, --task NAME or --config RUN_CONFIG")
    if on_error not in ("raise", "skip"):
        _fail(f"--on-error must be raise or skip, got {on_error!r}")
    _threads(threads)
    err_console = Console(stderr=True, markup=False, highlight=False)
    try:
        policy, tokenizer = load_policy(model)
        if config is not None:  # the run's own data path, prompt-length checks included
            from seqrl.train.builders import build_task_data

            cfg = load_config(config)
            the_task, _, items = build_task_data(cfg, tokenizer, policy)
            group_by = group_by or cfg.task.group_by
            max_new_tokens = max_new_tokens or cfg.rollout.max_new_tokens
        elif data is not None:
            columns = dict(c.split("=", 1) for c in column or [])
            the_task = FileTask(
                test=data,
                columns=columns,
                reward=reward,
                prompt_template=template,
                max_new_tokens=max_new_tokens or 256,
                on_error=on_error,
                test_split=split,
            )
            items = rendered(tokenizer, the_task.examples("test"), chat=chat)  # --limit: later
        else:
            the_task = get_task(task)
            n = min(limit or 200, the_task.max_examples("test"))
            items = rendered(tokenizer, the_task.examples("test", n), chat=chat)
        if group_by:
            check_group_by(items, group_by)  # a misspelt column fails before any sampling
        if config is None:
            items = _fitting_prompts(
                items, policy, tokenizer, the_task, max_new_tokens, max_prompt_tokens,
                on_error if data is not None else "raise", err_console,
            )  # fmt: skip
    except (ValueError, DataError, FileNotFoundError, ConfigError, SandboxUnavailableError) as err:
        message = str(err).replace("pass on_error='skip'", "pass --on-error skip")
        _fail(f"{model}: {message}" if "chat template" in message else message)
    if data is not None and the_task.reports["test"].skipped:
        r = the_task.reports["test"]
        err_console.print(f"note: {r.skipped} malformed rows skipped; first: {r.first_problems[0]}")
    if limit is not None and limit > len(items):
        err_console.print(
            f"note: --limit {limit} is more than the {len(items)} items: all are used"
        )
    items = items[:limit]
    if not items:
        _fail("no item left to evaluate")
    with Progress(console=Console(stderr=True)) as progress:
        bar = progress.add_task("sampling", total=len(items))
        records, summary = evaluate_policy(
            policy,
            tokenizer,
            the_task,
            items,
            k=k,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            batch_items=batch_items,
            seed=seed,
            group_by=group_by,
            on_batch=lambda n: progress.advance(bar, n),
        )
    if out is not None:
        with out.open("w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    table = Table(title=f"{model}: {len(items)} items × {k} samples (+ greedy)")
    for col in ("metric", "value", "95% CI"):
        table.add_column(col)
    for key, value in summary.items():
        if not key.endswith(("_ci_low", "_ci_high")):
            low, high = summary.get(key + "_ci_low"), summary.get(key + "_ci_high")
            ci = f"[{low:.3f}, {high:.3f}]" if low is not None else ""
            table.add_row(key, f"{value:.3f}", ci)
    Console().print(table)
    if out is not None:
        Console().print(f"per-item results: {out}")


def _fitting_prompts(
    items, policy, tokenizer, task, max_new_tokens, max_prompt_tokens, on_error, console
):
    """The items whose prompt leaves room for the generation budget (``seqrl eval``)."""
    from seqrl.tasks.lengths import check_prompt_lengths, context_length, prompt_limit

    limit, why = prompt_limit(
        max_prompt_tokens,
        context_length(policy),
        max_new_tokens=max_new_tokens or task.max_new_tokens,
        setting_name="--max-prompt-tokens",
    )
    if limit is None:
        return items
    fix = (
        "shorten or drop the row, or pass --on-error skip to leave such rows out"
        if on_error != "raise" or getattr(task, "reports", None)
        else "lower --max-new-tokens"
    )
    kept, problems = check_prompt_lengths(
        items, tokenizer, limit, why=why, split="test", on_error=on_error, fix=fix
    )
    if problems:
        console.print(f"note: {len(problems)} too long rows skipped; first: {problems[0]}")
    return kept


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
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP, min=1)] = None,
) -> None:
    """Plot the token critic's V(s_t) along correct vs incorrect responses (SPPO §2.10)."""
    from seqrl.train.diagnose import tail_effect as run_tail_effect

    _threads(threads)

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
    jobs: Annotated[int, typer.Option(min=1, help="runs at once (jobs × threads ≤ CPU cores)")] = 1,
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
            jobs=jobs,
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
