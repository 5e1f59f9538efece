"""Config errors: :class:`ConfigError`, and each pydantic error as one line naming its dotted key.

A line names the key, the closest valid key for a misspelling (or seqrl's name for another
framework's, :data:`CONFIG_ALIASES`) and the file, preset or override that set the value. The
functions take the root model as an argument, so this module imports nothing of the schema.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from seqrl.core.losses import FOREIGN_NAMES, _closest

# Names other frameworks (TRL, verl, OpenRLHF) use for our keys, for unknown-key hints.
CONFIG_ALIASES: dict[str, str] = {
    "learning_rate": "optim.lr",
    "max_grad_norm": "optim.grad_clip",
    "clip_grad": "optim.grad_clip",
    "lr_scheduler_type": "optim.schedule",
    "num_generations": "rollout.group_size",
    "n_samples_per_prompt": "rollout.group_size",
    "max_completion_length": "rollout.max_new_tokens",
    "response_length": "rollout.max_new_tokens",
    "max_steps": "train.steps",
    "total_steps": "train.steps",
    "ppo_mini_batch_size": "algo.num_minibatches",
    "num_iterations": "algo.ppo_epochs",
    "model_name_or_path": "model.policy",
    # seqrl.core's hints for loss hyperparameters, as dotted config keys
    **{
        foreign: "algo.name"
        if ours == "the policy_loss name"
        else " and ".join(f"algo.loss.{part}" for part in ours.split(" and "))
        for foreign, ours in FOREIGN_NAMES.items()
    },
}


class ConfigError(ValueError):
    """An invalid run configuration; ``problems`` lists each problem, one line each."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = f"invalid config: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"invalid config ({len(self.problems)} problems):\n{lines}"
        super().__init__(message)


def kind_of(value: Any) -> str:
    """'a mapping', 'a list', 'a string' or the type's name, for messages."""
    return {dict: "a mapping", list: "a list", str: "a string"}.get(
        type(value), type(value).__name__
    )


def describe(
    error: dict, sources: dict, root: type[BaseModel], top_level_keys: Iterable[str] = ()
) -> str:
    """One pydantic error of ``root`` as a line naming the dotted key (and where it was set).

    ``top_level_keys`` are keys a config file may hold besides ``root``'s fields (``preset``),
    offered as hints for a misspelt top-level key.
    """
    loc = tuple(error["loc"])
    dotted = _dotted(loc)
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        message = f"unknown key {dotted!r}{_key_hint(loc, root, top_level_keys)}"
    elif kind == "value_error" and not loc:
        return "\n".join(_strip(error["msg"]).splitlines())
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        message = f"{dotted}: expected a section (a mapping of keys), got {kind_of(value)} {_short(value)}"
    elif kind == "literal_error":
        options = re.findall(r"'([^']*)'|\b(True|False)\b", error["ctx"]["expected"])
        options = [a or b for a, b in options]
        hint = _closest(value, options) if isinstance(value, str) else ""
        message = f"{dotted}: must be one of {', '.join(options)}; got {_short(value)}{hint}"
    elif kind == "value_error":
        message = f"{dotted}: {_strip(error['msg'])}"
    else:
        message = f"{dotted}: {_strip(error['msg'])}; got {_short(value)}"
    origin = _source_of(loc, sources)
    if kind == "string_type" and isinstance(value, (dict, list)) and "override" in (origin or ""):
        message += (  # e.g. --set task.prompt_template=Q: {prompt} parses as a mapping
            f"; YAML read the value as {kind_of(value)}: quote it, "
            f"""--set '{dotted}="..."'"""
        )
    return f"{message} ({origin})" if origin else message


def _strip(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _source_of(loc: tuple, sources: dict) -> str | None:
    for cut in range(len(loc), 0, -1):
        if loc[:cut] in sources:
            return sources[loc[:cut]]
    below = [s for p, s in sources.items() if p[: len(loc)] == loc] if loc else []
    return below[-1] if below else None


def _model_at(path: tuple, root: type[BaseModel]) -> type[BaseModel] | None:
    model: Any = root
    for key in path:
        field = model.model_fields.get(key) if isinstance(key, str) else None
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    return model


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for key, field in model.model_fields.items():
        out.append(prefix + key)
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out += _all_keys(sub, f"{prefix}{key}.")
    return out


def _key_hint(loc: tuple, root: type[BaseModel], top_level_keys: Iterable[str]) -> str:
    """'; did you mean ...?' for an unknown key, searched at its level, then anywhere."""
    parent, key = loc[:-1], str(loc[-1])
    model = _model_at(parent, root)
    options = list(model.model_fields) if model else []
    if not parent:
        options += top_level_keys
    prefix = "".join(f"{p}." for p in parent)
    lower = {o.lower(): o for o in options}
    if key.lower() in lower:
        return f"; did you mean {prefix + lower[key.lower()]!r}?"
    if key in CONFIG_ALIASES:
        return f"; seqrl calls it {CONFIG_ALIASES[key]!r}"
    match = difflib.get_close_matches(key.lower(), list(lower), n=1, cutoff=0.6)
    if match:
        return f"; did you mean {prefix + lower[match[0]]!r}?"
    elsewhere = [k for k in _all_keys(root) if k.rsplit(".", 1)[-1].lower() == key.lower()]
    if elsewhere:
        return f"; did you mean {' or '.join(repr(k) for k in elsewhere)}?"
    if options:
        return (
            f" (valid keys{' under ' + repr(prefix[:-1]) if prefix else ''}: {', '.join(options)})"
        )
    return ""
