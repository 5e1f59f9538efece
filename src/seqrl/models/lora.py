"""LoRA adapters (via peft) for the policy and critics, and merging them back on save.

With ``model.lora.r > 0`` the policy's linear layers get rank-r adapters and only the adapters
train; the frozen base weights are shared with the reference policy, which is the base model with
the adapters switched off. Saving merges the adapters into a copy of the weights, so a run's
``final/`` is a plain Hugging Face model that transformers and vLLM load without peft (the
adapter alone is kept in ``final/adapter/`` as well).

peft is an optional dependency: ``pip install 'seqrl[peft]'``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError(
            "LoRA (model.lora.r > 0) needs peft: pip install 'seqrl[peft]' (or pip install peft)"
        ) from None
    return peft


@contextmanager
def _quiet():
    """peft asks transformers about gradient checkpointing by its deprecated name."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


def is_lora(model: torch.nn.Module) -> bool:
    """True for a model wrapped with peft adapters."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def apply_lora(
    model: torch.nn.Module,
    *,
    r: int,
    alpha: float,
    target_modules: str | Sequence[str] = "all-linear",
    task_type: str = "CAUSAL_LM",
    modules_to_save: Sequence[str] | None = None,
) -> torch.nn.Module:
    """``model`` wrapped with rank-``r`` LoRA adapters (scale alpha / r); only they train.

    The adapters start as an exact no-op (peft initialises B = 0), so the wrapped model computes
    the same function as ``model``. ``modules_to_save`` names modules trained in full alongside
    (a critic's fresh value head). ``task_type``: ``"CAUSAL_LM"`` for policies,
    ``"TOKEN_CLS"`` for critics.
    """
    peft = _peft()
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,  # RL keeps dropout off (see seqrl.train.step.update_policy)
        target_modules=targets,
        task_type=task_type,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
    )
    try:
        with _quiet():
            return peft.get_peft_model(model, config)
    except ValueError as err:  # e.g. no module matches target_modules
        raise ValueError(f"cannot add LoRA adapters to this model: {err}") from None


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """A plain model with the adapters folded into its weights (``model`` itself is untouched)."""
    if not is_lora(model):
        return model
    with _quiet():
        return copy.deepcopy(model).merge_and_unload()


def save_adapter(model: torch.nn.Module, out_dir: str | Path) -> None:
    """The adapter weights and config alone (peft's format) in ``out_dir``."""
    with _quiet():
        model.save_pretrained(Path(out_dir))


class AdaptersOff:
    """Calls a peft-wrapped model with its adapters switched off: the frozen base model.

    Used as the reference policy of a LoRA run, so the reference costs no extra weights.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(self, **kwargs):
        with self.model.disable_adapter():
            return self.model(**kwargs)
