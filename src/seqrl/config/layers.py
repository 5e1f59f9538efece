"""The layers a run config is merged from, before validation: YAML, presets, overrides.

Lowest first: packaged presets (``preset: NAME``, recursively) < the YAML file < ``key=value``
overrides (schema defaults, below them all, are the validation's). Mappings are deep-merged
(the later layer wins key by key); any other value, lists included, is replaced. An override
replaces whatever was at its key, so ``algo.loss={}`` clears a preset's loss settings.

:func:`resolve_layers` returns the merged mapping and, for error messages, the file, preset or
override that set each leaf.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

import yaml

from seqrl.config.messages import ConfigError, kind_of
from seqrl.core.losses import _closest

DEFAULT_PRESET = "default"

# Keys of a config file that are not RunConfig fields: consumed here, before validation.
LAYER_KEYS = ("preset",)

# name → (one-line description, paper). The YAML files under seqrl/presets hold only config.
PRESET_INFO: dict[str, tuple[str, str]] = {
    "default": (
        "the embedded demo: GSPO on the built-in tiny model and 3-digit addition",
        "arXiv 2507.18071",
    ),
    "grpo": (
        "group-normalised advantages, per-sequence mean, k3 KL (β = 0.04) to a frozen reference",
        "arXiv 2402.03300",
    ),
    "dapo": (
        "as the paper: clip-higher [0.2, 0.28], token-mean, dynamic sampling, soft overlong "
        "punishment, ±1 reward, no dual clip",
        "arXiv 2503.14476",
    ),
    "dapo_verl": (
        "DAPO as verl's recipe runs it (FIPO's baseline): `dapo` + dual clip 10, warm-up 10, "
        "weight decay 0.1",
        "arXiv 2503.14476, 2603.19835",
    ),
    "fipo": (
        "FIPO, official 32B settings: future-KL weights [1.0, 1.2], τ 32, safety 10, drop rule, "
        "8 minibatches, on dapo_verl",
        "arXiv 2603.19835",
    ),
    "fipo_7b": ("FIPO's 7B pilot: weights [0.8, 1.2], safety 3.0", "arXiv 2603.19835"),
    "fipo_swift": (
        "FIPO with ms-swift's defaults: no ratio filter, dual clip or drop rule; safety 4.0",
        "arXiv 2603.19835",
    ),
    "dr_grpo": (
        "group-centred advantages, token sum / MAX_TOKENS (the generation budget)",
        "arXiv 2503.20783",
    ),
    "gspo": (
        "sequence-level ratio and clipping [3e-4, 4e-4], 4 minibatches per rollout",
        "arXiv 2507.18071",
    ),
    "gspo_moe": (
        "GSPO on the tiny MoE warm start, no Routing Replay; logs routing churn",
        "arXiv 2507.18071",
    ),
    "grpo_moe_replay": (
        "GRPO on the tiny MoE warm start with Routing Replay (R2); logs routing churn",
        "arXiv 2507.18071",
    ),
    "gspo_token": (
        "GSPO-token: sg[s_i]·π/sg[π] token ratios, same clipping as GSPO",
        "arXiv 2507.18071",
    ),
    "rloo": ("leave-one-out baseline over the group, verl's clipped loss", "arXiv 2402.14740"),
    "remax": (
        "one sample per prompt, greedy-decoding baseline, verl's clipped loss",
        "arXiv 2310.10505",
    ),
    "sppo": (
        "one sample per prompt, A = R − V(prompt) from a scalar BCE critic (policy-sized), "
        "clip 0.2, dual clip 3",
        "arXiv 2604.08865",
    ),
    "sppo_small_critic": (
        "SPPO with a decoupled critic smaller than the policy (built-in nano, random init)",
        "arXiv 2604.08865",
    ),
    "ppo": (
        "token critic, GAE γ = λ = 1, whitened, clipped value loss, critic warm-up (SPPO's baseline)",
        "arXiv 1707.06347",
    ),
}


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """safe_load plus YAML 1.2 floats (1e-4, 3e4) and an error on duplicate keys."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Dumper(yaml.SafeDumper):
    """safe_dump with lists inline ([0.9, 0.999]) and mappings as blocks."""


_Dumper.add_representer(
    list,
    lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True),
)


def dump_yaml(data: Mapping) -> str:
    """``data`` as block YAML in key order, lists inline; :func:`read_mapping` reads it back."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        detail = f"{context}; {problem}" if context and problem != context else problem
        raise ConfigError(f"{source}: invalid YAML{where}: {detail}") from None


def read_mapping(text: str, source: str) -> dict:
    """A YAML document whose top level is a mapping (empty → {})."""
    data = parse_yaml(text, source)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, not {kind_of(data)}")
    return data


# --------------------------------------------------------------------------- presets


def _presets_dir():
    return resources.files("seqrl") / "presets"


def preset_names() -> list[str]:
    return sorted(
        p.name[: -len(".yaml")] for p in _presets_dir().iterdir() if p.name.endswith(".yaml")
    )


def list_presets() -> list[tuple[str, str, str]]:
    """(name, description, paper) of every packaged preset, default first."""
    return [(name, *PRESET_INFO.get(name, ("", ""))) for name in _ordered_presets()]


def _ordered_presets() -> list[str]:
    names = preset_names()
    return [n for n in PRESET_INFO if n in names] + [n for n in names if n not in PRESET_INFO]


def _read_preset(name: Any, needed_by: str) -> dict:
    """The packaged preset ``name`` as written (its own ``preset:`` not yet expanded)."""
    names = preset_names()
    if not isinstance(name, str) or name not in names:
        hint = _closest(name, names) if isinstance(name, str) else ""
        raise ConfigError(
            f"unknown preset {name!r} (in {needed_by}){hint} (presets: {', '.join(names)})"
        )
    text = (_presets_dir() / f"{name}.yaml").read_text(encoding="utf-8")
    return read_mapping(text, f"preset {name!r}")


def _expand_presets(doc: dict, source: str, chain: tuple[str, ...], sources: dict) -> dict:
    """``doc`` merged over its preset chain; records the source of every leaf in ``sources``."""
    doc = dict(doc)
    preset = doc.pop("preset", None)
    base: dict = {}
    if preset is not None:
        if preset in chain:
            cycle = " → ".join(f"{p!r}" for p in (*chain, preset))
            raise ConfigError(f"preset cycle: {cycle}")
        base = _read_preset(preset, source)
        base = _expand_presets(base, f"preset {preset!r}", (*chain, preset), sources)
    _record_sources(doc, (), source, sources)
    return _deep_merge(base, doc)


def _deep_merge(base: dict, child: Mapping) -> dict:
    """``base`` updated by ``child``: mappings merge recursively, anything else is replaced."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _record_sources(data: Any, path: tuple, source: str, sources: dict) -> None:
    if isinstance(data, Mapping) and data:
        for key, value in data.items():
            _record_sources(value, (*path, str(key)), source, sources)
    elif path:
        sources[path] = source


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """``"a.b.c=value"`` → (("a", "b", "c"), value parsed as YAML: 1e-4, null, [1, 2], ...)."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(
            f"override {text!r} is not of the form key=value (e.g. 'train.steps=10', "
            "'algo.loss.clip_high=4e-4', 'model.reference=null')"
        )
    key, raw = (part.strip() for part in text.split("=", 1))
    path = tuple(key.split("."))
    if not key or not all(path):
        raise ConfigError(f"override {text!r}: {key!r} is not a dotted key such as 'train.steps'")
    if not raw:
        raise ConfigError(f"override {text!r} has no value; write '{key}=null' for null")
    return path, parse_yaml(raw, f"override {text!r}")


def _apply_override(data: dict, path: tuple[str, ...], value: Any, text: str) -> None:
    node = data
    for depth, key in enumerate(path[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            where = ".".join(path[: depth + 1])
            raise ConfigError(
                f"override {text!r}: {where!r} is {kind_of(child)} ({child!r}), not a section"
            )
        node = child
    node[path[-1]] = value


# --------------------------------------------------------------------------- all layers


def resolve_layers(
    data: Mapping, overrides: Iterable[str] = (), *, source: str
) -> tuple[dict, dict[tuple, str]]:
    """``data`` over its preset chain, with ``overrides`` applied last (``preset=NAME`` swaps the
    base preset): the merged mapping and the source (file, preset or override) of every leaf."""
    if isinstance(overrides, str):
        overrides = [overrides]
    parsed = [(*parse_override(text), text) for text in overrides]
    doc = dict(data)
    for key, value, text in parsed:
        if key == ("preset",):
            _read_preset(value, f"override {text!r}")  # fail early, naming the override
            doc["preset"] = value
    sources: dict[tuple, str] = {}
    merged = _expand_presets(doc, source, (), sources)
    for key, value, text in parsed:
        if key != ("preset",):
            _apply_override(merged, key, value, text)
            _forget_sources(sources, key)
            sources[key] = f"override {text!r}"
    return merged, sources


def _forget_sources(sources: dict, prefix: tuple) -> None:
    for path in [p for p in sources if p[: len(prefix)] == prefix]:
        del sources[path]
