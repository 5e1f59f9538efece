"""The KV cache across transformers versions: which keyword a forward takes it by, where it comes back.

transformers 5.x renamed a model forward's ``past_key_values`` argument and output field to
``cache``; the old name is deprecated (a warning on every run) and due to be removed. seqrl
supports transformers ≥ 5.0, so it asks each model which name its forward declares.

>>> from seqrl.models import build_tiny_model, build_tokenizer
>>> model = build_tiny_model(build_tokenizer(), size="nano", seed=0)
>>> cache_keyword(model) in ("cache", "past_key_values")
True
"""

from __future__ import annotations

import functools
import inspect

from torch import nn


def _base(model) -> nn.Module:
    """The transformers model under wrappers whose call takes ``**kwargs`` only: a PEFT model
    (``get_base_model``) or a plain callable holding one in ``.model`` (``AdaptersOff``)."""
    for _ in range(8):
        if callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        elif not isinstance(model, nn.Module) and hasattr(model, "model"):
            model = model.model
        else:
            break
    return model


@functools.cache
def _keyword_of(cls: type) -> str:
    try:
        parameters = inspect.signature(cls.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return "past_key_values"  # no inspectable signature: the name every version accepts
    return "cache" if "cache" in parameters else "past_key_values"


def cache_keyword(model) -> str:
    """``"cache"`` where the model's forward declares it, else ``"past_key_values"``."""
    return _keyword_of(type(_base(model)))


def returned_cache(output):
    """The KV cache a forward returned (``output.cache`` or, before the rename, ``past_key_values``).

    Read by key, so the deprecated alias (and its warning) is never touched; None without one.
    """
    cache = output.get("cache")
    return output.get("past_key_values") if cache is None else cache
