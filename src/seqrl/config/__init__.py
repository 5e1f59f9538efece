"""Run configuration: pydantic models, packaged YAML presets, ``key=value`` overrides.

    cfg = load_config("my_run.yaml", ["algo.loss.clip_high=5e-4", "train.steps=10"])
    cfg.resolved_loss()        # the seqrl.core.PolicyLossConfig the trainer runs
    validate_warnings(cfg)     # settings that run but are probably not what you meant
    cfg.to_yaml()              # the fully resolved, self-contained config

Modules, each importing only those above it (checks names RunConfig in annotations only):

    messages   ConfigError, and each pydantic error as one line naming its dotted key
    layers     YAML, packaged presets and overrides, merged into one mapping (before validation)
    checks     rules across sections (errors) and validate_warnings
    schema     the section models and RunConfig
    loading    load_config, config_from_dict, and resume_config (what --resume may change)
"""

from seqrl.config.checks import validate_warnings
from seqrl.config.layers import DEFAULT_PRESET, list_presets, parse_override
from seqrl.config.loading import RESUME_SAFE_KEYS, config_from_dict, load_config, resume_config
from seqrl.config.messages import CONFIG_ALIASES, ConfigError
from seqrl.config.schema import (
    AlgoConfig,
    CriticConfig,
    DistConfig,
    FSDPConfig,
    HubConfig,
    LogConfig,
    LossOverrides,
    MismatchConfig,
    ModelConfig,
    OptimConfig,
    RewardConfig,
    RolloutConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
    VLLMConfig,
)

__all__ = [
    "CONFIG_ALIASES",
    "DEFAULT_PRESET",
    "RESUME_SAFE_KEYS",
    "AlgoConfig",
    "ConfigError",
    "CriticConfig",
    "DistConfig",
    "FSDPConfig",
    "HubConfig",
    "LogConfig",
    "LossOverrides",
    "MismatchConfig",
    "ModelConfig",
    "OptimConfig",
    "RewardConfig",
    "RolloutConfig",
    "RunConfig",
    "TaskConfig",
    "TrainConfig",
    "VLLMConfig",
    "config_from_dict",
    "list_presets",
    "load_config",
    "parse_override",
    "resume_config",
    "validate_warnings",
]
