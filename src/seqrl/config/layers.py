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
import difflib
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

import yaml

from seqrl.config.messages import ConfigError, kind_of
from seqrl.core.losses import _closest

DEFAULT_PRESET = "default"

# Keys of a config file that are not RunConfig fields: consumed here, before validation.
# ``about: {summary: ..., paper: ...}`` describes the file (``seqrl presets`` lists the packaged
# presets' own) and sets nothing; every preset has one, and a user's config may.
LAYER_KEYS = ("preset", "about")
ABOUT_KEYS = ("summary", "paper")

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
    """(name, summary, paper) of every packaged preset, from its ``about``; default first."""
    names = preset_names()
    names.sort(key=lambda name: name != DEFAULT_PRESET)  # stable: the rest stay sorted
    out = []
    for name in names:
        about = _read_preset(name, "the preset list").get("about")
        about = about if isinstance(about, dict) else {}
        out.append((name, str(about.get("summary", "")), str(about.get("paper", ""))))
    return out


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
    _check_about(doc.pop("about", None), {}, source)
    base: dict = {}
    if preset is not None:
        if preset in chain:
            cycle = " → ".join(f"{p!r}" for p in (*chain, preset))
            raise ConfigError(f"preset cycle: {cycle}")
        base = _read_preset(preset, source)
        base = _expand_presets(base, f"preset {preset!r}", (*chain, preset), sources)
    _record_sources(doc, (), source, sources)
    return _deep_merge(base, doc)


def _check_about(about: Any, sources: dict, source: str) -> None:
    """``about`` holds only the strings ``summary`` and ``paper``: anything else is an error, as
    a misspelt key anywhere else is."""
    if about is None:
        return
    if not isinstance(about, dict):
        raise ConfigError(
            f"about: expected a mapping of {' and '.join(ABOUT_KEYS)}, got {kind_of(about)} "
            f"({sources.get(('about',), source)})"
        )
    problems = []
    for key, value in about.items():
        origin = sources.get(("about", str(key))) or sources.get(("about",), source)
        if key not in ABOUT_KEYS:
            match = difflib.get_close_matches(str(key).lower(), ABOUT_KEYS, n=1, cutoff=0.6)
            hint = (
                f"; did you mean 'about.{match[0]}'?"
                if match
                else f" (valid keys under 'about': {', '.join(ABOUT_KEYS)})"
            )
            problems.append(f"unknown key 'about.{key}'{hint} ({origin})")
        elif not isinstance(value, str):
            problems.append(f"about.{key}: expected a string, got {kind_of(value)} ({origin})")
    if problems:
        raise ConfigError(problems)


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
    try:
        return path, parse_yaml(raw, f"override {text!r}")
    except ConfigError as err:
        raise ConfigError(f"{err.problems[0]}; {QUOTE_HINT.format(key=key)}") from None


QUOTE_HINT = (
    "a value is read as YAML, so text with {{ }}, [ ], ': ' or ' #' needs quotes inside the "
    """shell's: --set '{key}="..."'"""
)
"""What to do when an override's value is not the YAML the user meant (a template, a colon)."""


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
    _check_about(merged.pop("about", None), sources, "the overrides")
    return merged, sources


def _forget_sources(sources: dict, prefix: tuple) -> None:
    for path in [p for p in sources if p[: len(prefix)] == prefix]:
        del sources[path]
