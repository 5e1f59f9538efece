"""Load a run config: :func:`load_config` (a YAML file or a preset name), :func:`config_from_dict`,
and :func:`resume_config` (a run directory's saved config, with the changes a resume allows).

    cfg = load_config("my_run.yaml", ["algo.loss.clip_high=5e-4", "train.steps=10"])

Layering, lowest first: schema defaults < packaged presets < the YAML file < overrides (see
:mod:`seqrl.config.layers`). Every problem is reported as one :class:`ConfigError` naming the
dotted key, the closest valid key for a misspelling, and the file, preset or override that set it.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from seqrl.config.layers import (
    DEFAULT_PRESET,
    parse_override,
    preset_names,
    read_mapping,
    resolve_layers,
)
from seqrl.config.messages import ConfigError
from seqrl.config.schema import RunConfig, validate_layers
from seqrl.core.losses import _closest


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Load a run config: the default preset (``path=None``), a YAML file, or a preset name.

    ``overrides`` are ``"dotted.key=value"`` strings applied last (``"preset=NAME"`` swaps the
    base preset). Raises :class:`ConfigError` for every kind of problem.
    """
    if path is None:
        doc, source = {"preset": DEFAULT_PRESET}, "the default config"
    else:
        file = Path(path)
        if not file.exists() and str(path) in preset_names():
            doc, source = {"preset": str(path)}, f"preset {str(path)!r}"
        else:
            doc = relative_to(read_mapping(_read_text(file), str(file)), file.parent)
            source = str(file)
    return config_from_dict(doc, overrides, source=source)


DATA_KEYS = (("task", "train_file"), ("task", "test_file"))
MODEL_KEYS = (("model", "policy"), ("model", "reference"), ("critic", "model"))
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def relative_to(doc: dict, folder: Path) -> dict:
    """``doc`` (a YAML file's mapping) with its relative paths made absolute against ``folder``,
    the file's own: data files always (except a Hub dataset id that is no such path), model
    directories when they exist there (else the value may be a Hub model id, kept as it is).
    ``output_dir`` and ``--set`` values stay relative to the working directory."""
    out = copy.deepcopy(doc)
    for keys, always in [(k, True) for k in DATA_KEYS] + [(k, False) for k in MODEL_KEYS]:
        section = out.get(keys[0])
        value = section.get(keys[1]) if isinstance(section, dict) else None
        if not isinstance(value, str) or ":" in value or value in ("", "policy"):
            continue  # builtin:NAME, critic.model=policy, non-strings: as they are
        if Path(value).is_absolute():
            continue
        candidate = (folder / value).resolve()
        hub_like = _HUB_ID.fullmatch(value) and not value.lower().endswith(_DATA_SUFFIXES)
        if candidate.exists() or (always and not hub_like):
            section[keys[1]] = str(candidate)
    return out


def config_from_dict(
    data: Mapping, overrides: Iterable[str] = (), *, source: str = "the config dict"
) -> RunConfig:
    """Validate a config mapping (which may name a ``preset``) with overrides applied last."""
    return validate_layers(*resolve_layers(data, overrides, source=source))


RESUME_SAFE_KEYS = (
    "train.steps",
    "train.eval_every",
    "train.eval_samples",
    "train.eval_temperature",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.log_samples",
    "train.max_nonfinite_steps",
    "train.time_limit_s",
    "threads",
    "log",
    "hub",
)
"""Keys (or whole sections) ``--resume`` may change: how long the run goes on, how often it is
evaluated and checkpointed, where it is logged. Everything else would make the resumed steps
differ from what the saved optimizer, schedule and data order were made for."""


def resume_config(run_dir: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    """The saved ``run_dir/config.yaml`` with ``overrides`` applied; a :class:`ConfigError` names
    every override of a key outside :data:`RESUME_SAFE_KEYS` and why it cannot change."""
    config_path = Path(run_dir) / "config.yaml"
    if not config_path.exists():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: is it a seqrl run directory?")
    overrides = [overrides] if isinstance(overrides, str) else list(overrides)
    problems = []
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if not any(key == safe or key.startswith(safe + ".") for safe in RESUME_SAFE_KEYS):
            problems.append(
                f"--set {text!r}: {key} cannot change when resuming (the checkpoint's optimizer, "
                "schedule and data order were made for its saved value); keys a resume may "
                f"change: {', '.join(RESUME_SAFE_KEYS)} (log and hub: any key below them). "
                f"To change {key}, start a new run, e.g. from {Path(run_dir) / 'final'}"
            )
    if problems:
        raise ConfigError(problems)
    return load_config(config_path, overrides)


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        hint = ""
        if file.suffix not in (".yaml", ".yml") and len(file.parts) == 1:
            names = preset_names()
            hint = f"{_closest(file.name, names)} (presets: {', '.join(names)})"
        raise ConfigError(f"config file not found: {file}{hint}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {file}: {err}") from None
