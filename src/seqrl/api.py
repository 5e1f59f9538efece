"""The Python API: train, warm-start and evaluate from a script or a notebook.

    import seqrl

    def score(completion, example):                   # your verifier: 1.0 right, 0.0 wrong
        return float(completion.split()[:1] == [example.answer])

    config = {"preset": "grpo", "train": {"steps": 20}}     # a dict, a YAML path or a preset
    warm = seqrl.SFTTrainer(config, train_data="data.jsonl", out="warm").train()
    run = seqrl.RLTrainer(config, train_data="data.jsonl", reward=score,
                          overrides=[f"model.policy={warm.model_dir}"]).train()
    run.final_model, run.summary["greedy_acc_end"], run.metrics[-1]
    seqrl.evaluate(run.final_model, config=run.config, k=8)["greedy_acc"]

Everything goes through the same config, checks and code as the ``seqrl`` command: a
:class:`RLTrainer` is ``seqrl train``, an :class:`SFTTrainer` is ``seqrl sft CONFIG`` and
:func:`evaluate` is ``seqrl eval``. Data may be a file path (or Hugging Face dataset directory or
Hub id), a list of row dicts, or a ``datasets.Dataset``; in-memory rows are written once to
``<output_dir>/.seqrl-data/<content hash>.jsonl`` so that the run's config.yaml names real
files and ``seqrl train --resume`` works. Reward functions may be given as callables: one that
``module:function`` imports back is recorded by that name, any other (a lambda, a function of the
running script) works in this process (see :func:`seqrl.tasks.rewards.function_spec`).

These names are the stable surface; the modules under them may change.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seqrl.config import RunConfig, config_from_dict
from seqrl.config import load_config as _load_file
from seqrl.tasks.rewards import function_spec

__all__ = ["RLTrainer", "RunResult", "SFTResult", "SFTTrainer", "evaluate", "load_config"]

ConfigLike = RunConfig | Mapping | str | Path | None
DataLike = str | Path | Sequence[Mapping] | Any  # a path, rows, or a datasets.Dataset
RewardLike = str | Callable[[str, Any], float]


def load_config(config: ConfigLike = None, overrides: Sequence[str] = ()) -> RunConfig:
    """A validated run config from a dict, a YAML file, a preset name, a RunConfig, or None (the
    default preset), with ``"dotted.key=value"`` overrides applied last.

    In a dict, ``task.reward`` and each ``reward.terms[i].fn`` may be Python callables.
    Raises :class:`seqrl.config.ConfigError` naming every problem.
    """
    if isinstance(config, RunConfig):
        return config.with_overrides(overrides) if overrides else config
    if isinstance(config, Mapping):
        return config_from_dict(_named_functions(config), overrides)
    return _load_file(config, overrides)


def _named_functions(config: Mapping) -> dict:
    """A plain copy of ``config``: callables become their specs (:func:`function_spec`), paths
    strings; anything else that is not a YAML value is a TypeError naming it."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if callable(value):
            return function_spec(value)
        raise TypeError(f"config value {value!r} is not a YAML value, a path or a function")

    return json.loads(json.dumps(config, default=plain))


@dataclass(frozen=True)
class RunResult:
    """What an RL run left behind: where it is, its metrics and its final model."""

    run_dir: Path
    final_model: Path  # Hugging Face format: load_policy / from_pretrained / vLLM read it
    metrics: list[dict]  # every record of metrics.jsonl (steps and evaluations), in order
    summary: dict  # held-out accuracy at start and end, steps, wall time (Trainer.summary)
    config: RunConfig  # the fully resolved config (run_dir/config.yaml)

    @property
    def evals(self) -> list[dict]:
        """The evaluation records (``eval/*`` metrics at step 0, every eval_every, the end)."""
        return [r for r in self.metrics if any(k.startswith("eval/") for k in r)]


@dataclass(frozen=True)
class SFTResult:
    """A supervised warm start: where the model is and its held-out greedy accuracy."""

    model_dir: Path
    greedy_acc_start: float
    greedy_acc: float  # after training
    loss: float  # of the last step
    seconds: float
    groups: dict[str, float]  # greedy accuracy per task.group_by value, after training


class RLTrainer:
    """One RL run, as ``seqrl train`` runs it (in the spirit of TRL's trainer objects).

    ``config``: a dict, YAML path, preset name or RunConfig (see :func:`load_config`).
    ``train_data`` / ``eval_data``: a data file, rows or a ``datasets.Dataset``; giving
    ``train_data`` makes the task a file task, and without ``eval_data`` a tenth of its rows is
    held out. ``reward``: ``"math"``, ``"code"``, ``"exact"``, ``"module:function"`` or a
    callable ``f(completion, example) -> float``, the verifier. ``overrides``: dotted
    ``key=value`` strings applied last. ``threads`` (or the config's): torch's CPU threads.
    """

    def __init__(
        self,
        config: ConfigLike = None,
        *,
        train_data: DataLike | None = None,
        eval_data: DataLike | None = None,
        reward: RewardLike | None = None,
        overrides: Sequence[str] = (),
        threads: int | None = None,
        progress: bool = False,
    ) -> None:
        self.config = _with_data(load_config(config, overrides), train_data, eval_data, reward)
        if threads is not None:
            self.config = self.config.with_overrides([f"threads={threads}"])
        self.progress = progress
        self._resume: tuple[Path, list[str]] | None = None

    @classmethod
    def resume(
        cls,
        run_dir: str | Path,
        overrides: Sequence[str] = (),
        *,
        functions: Sequence[Callable] = (),
        progress: bool = False,
    ) -> RLTrainer:
        """Continue the run in ``run_dir``; ``overrides`` as ``seqrl train --resume --set``.

        ``functions``: the Python callables the run was given that its config names as
        ``callable:<name>`` (a new process must be handed them again).
        """
        from seqrl.config import resume_config

        for fn in functions:
            function_spec(fn)
        self = cls.__new__(cls)
        self.config, self.progress = resume_config(run_dir, overrides), progress
        self._resume = (Path(run_dir), list(overrides))
        return self

    def train(self) -> RunResult:
        """Run (or continue) the run to ``train.steps``; the final model and metrics."""
        from seqrl.train.metrics import read_metrics
        from seqrl.train.trainer import Trainer

        if self.config.threads is not None:
            from seqrl.threads import set_threads

            set_threads(self.config.threads)
        if self._resume is not None:
            trainer = Trainer.resume(*self._resume, progress=self.progress)
        else:
            trainer = Trainer(self.config, progress=self.progress)
        summary = trainer.fit()
        if trainer.cfg.hub.repo_id and trainer.dist.is_main:
            from seqrl.hub import push_run

            push_run(trainer.run_dir, trainer.cfg.hub)
        return RunResult(
            run_dir=trainer.run_dir,
            final_model=trainer.run_dir / "final",
            metrics=read_metrics(trainer.run_dir) if trainer.dist.is_main else [],
            summary=summary,
            config=trainer.cfg,
        )


class SFTTrainer:
    """A supervised warm start, as ``seqrl sft CONFIG`` runs it: the config's model and task
    (prompts encoded exactly as the RL run will encode them), saved to ``out``.

    The arguments shared with :class:`RLTrainer` mean the same; ``steps``, ``batch_size``,
    ``lr`` and ``seed`` (default: the config's) are the SFT settings of ``seqrl sft``.
    """

    def __init__(
        self,
        config: ConfigLike = None,
        *,
        out: str | Path,
        train_data: DataLike | None = None,
        eval_data: DataLike | None = None,
        reward: RewardLike | None = None,
        overrides: Sequence[str] = (),
        steps: int = 300,
        batch_size: int = 64,
        lr: float = 1e-3,
        seed: int | None = None,
        threads: int | None = None,
    ) -> None:
        from seqrl.train.sft import SFTSettings

        self.config = _with_data(load_config(config, overrides), train_data, eval_data, reward)
        self.out = Path(out)
        self.threads = threads if threads is not None else self.config.threads
        seed = self.config.seed if seed is None else seed
        self.settings = SFTSettings(steps=steps, batch_size=batch_size, lr=lr, seed=seed)

    def train(self) -> SFTResult:
        from rich.console import Console

        from seqrl.train.sft import sft_from_config

        if self.threads is not None:
            from seqrl.threads import set_threads

            set_threads(self.threads)
        out = sft_from_config(self.config, self.settings, out_dir=self.out, console=Console())
        return SFTResult(
            model_dir=self.out,
            greedy_acc_start=out["greedy_acc_start"],
            greedy_acc=out["greedy_acc"],
            loss=out["loss"],
            seconds=out["seconds"],
            groups={k.split("/", 1)[1]: v for k, v in out.items() if k.startswith("greedy_acc/")},
        )


def evaluate(
    model: str | Path,
    config: ConfigLike = None,
    *,
    data: DataLike | None = None,
    reward: RewardLike | None = None,
    overrides: Sequence[str] = (),
    k: int = 16,
    limit: int | None = None,
    temperature: float = 1.0,
    max_new_tokens: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """``seqrl eval``: greedy accuracy, avg@k, pass@k and cons@k of ``model`` (a directory or
    ``builtin:NAME``) on the config's held-out problems, or on ``data`` (all its rows), with the
    config's template, chat setting, verifier (or ``reward``) and ``task.group_by``.

    Returns the summary: ``greedy_acc``, ``avg@k``, ``pass@j``, ``cons@k`` with
    ``*_ci_low`` / ``*_ci_high`` 95% bootstrap bounds, and per-group accuracies.
    """
    import tempfile

    from seqrl.evaluation import evaluate_policy
    from seqrl.models import load_policy
    from seqrl.train.builders import build_task_data

    cfg = load_config(config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        if data is not None:  # every row of `data` is evaluated
            test = _yaml(_data_file(data, Path(tmp), "eval"))
            cfg = cfg.with_overrides(
                [
                    "task.name=file",
                    f"task.train_file={test}",
                    f"task.test_file={test}",
                    f"task.eval_size={2**62}",
                ]
            )
        if reward is not None:
            cfg = cfg.with_overrides([f"task.reward={_yaml(function_spec(reward))}"])
        policy, tokenizer = load_policy(model)
        task, _, items = build_task_data(cfg, tokenizer)
        return evaluate_policy(
            policy,
            tokenizer,
            task,
            items[:limit] if limit else items,
            k=k,
            temperature=temperature,
            max_new_tokens=max_new_tokens or cfg.rollout.max_new_tokens,
            seed=seed,
            group_by=cfg.task.group_by,
        )[1]


# ---------------------------------------------------------------------------- data


def _with_data(cfg: RunConfig, train, test, reward) -> RunConfig:
    """``cfg`` on the given data and verifier (in-memory rows written under output_dir)."""
    overrides = []
    folder = Path(cfg.output_dir) / ".seqrl-data"
    if train is not None:
        overrides += [
            "task.name=file",
            f"task.train_file={_yaml(_data_file(train, folder, 'train'))}",
        ]
        overrides.append("task.test_file=null")  # replaced below, else a tenth held out
    if test is not None:
        overrides.append(f"task.test_file={_yaml(_data_file(test, folder, 'eval'))}")
    if reward is not None:
        overrides.append(f"task.reward={_yaml(function_spec(reward))}")
    return cfg.with_overrides(overrides) if overrides else cfg


def _yaml(value: Any) -> str:
    return json.dumps(str(value))  # a JSON string is a YAML string: no quoting surprises


def _data_file(data: DataLike, folder: Path, kind: str) -> str:
    """A path for ``data``: itself when it is one, else its rows written as JSONL once."""
    if isinstance(data, (str, Path)):
        return str(Path(data).resolve()) if Path(data).exists() else str(data)
    if hasattr(data, "keys") and hasattr(data, "column_names") and callable(data.keys):
        raise TypeError(
            f"{kind} data is a DatasetDict with splits {list(data.keys())}: pick one, "
            "e.g. data['train']"
        )
    rows = data.to_list() if hasattr(data, "to_list") else list(data)
    lines = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"{kind} data, row {i}: expected a dict of fields, got {row!r:.80}")
        try:
            lines.append(json.dumps(dict(row), ensure_ascii=False, sort_keys=True))
        except TypeError as err:
            raise TypeError(f"{kind} data, row {i}: not JSON-serialisable ({err})") from None
    if not lines:
        raise ValueError(f"{kind} data has no rows")
    text = "\n".join(lines) + "\n"
    path = folder / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return str(path.resolve())
