"""Load a run config: :func:`load_config` (a YAML file or a preset name) and :func:`config_from_dict`.

    cfg = load_config("my_run.yaml", ["algo.loss.clip_high=5e-4", "train.steps=10"])

Layering, lowest first: schema defaults < packaged presets < the YAML file < overrides (see
:mod:`seqrl.config.layers`). Every problem is reported as one :class:`ConfigError` naming the
dotted key, the closest valid key for a misspelling, and the file, preset or override that set it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from seqrl.config.layers import DEFAULT_PRESET, preset_names, read_mapping, resolve_layers
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
            doc, source = read_mapping(_read_text(file), str(file)), str(file)
    return config_from_dict(doc, overrides, source=source)


def config_from_dict(
    data: Mapping, overrides: Iterable[str] = (), *, source: str = "the config dict"
) -> RunConfig:
    """Validate a config mapping (which may name a ``preset``) with overrides applied last."""
    return validate_layers(*resolve_layers(data, overrides, source=source))


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
