"""The benchmark scripts' seqrl settings stay valid as the config's checks grow."""

import importlib.util
import sys
from pathlib import Path

import pytest

from seqrl.config import load_config

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


vs_trl = _module("vs_trl")


@pytest.mark.parametrize("arm", sorted(vs_trl.ARMS))
@pytest.mark.parametrize("shape", sorted(vs_trl.SHAPES))
def test_every_vs_trl_shape_and_arm_is_a_valid_config(shape, arm):
    spec = vs_trl.SHAPES[shape]
    overrides = [*vs_trl.seqrl_overrides(spec), "model.policy=builtin:tiny", *vs_trl.ARMS[arm]]
    cfg = load_config(None, overrides)
    assert cfg.rollout.group_size == spec.group_size
    assert cfg.rollout.prompts_per_step == spec.prompts
