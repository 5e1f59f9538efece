"""seqrl.config: presets, inheritance, overrides, error messages, warnings, YAML round trip."""

import dataclasses
from pathlib import Path

import pytest
from pydantic import ValidationError

import seqrl.config.layers as layers
from seqrl.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    list_presets,
    load_config,
    parse_override,
    validate_warnings,
)
from seqrl.core import POLICY_LOSS_DEFAULTS, resolve_policy_loss_config

PRESETS = [name for name, _, _ in list_presets()]


def _write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# --------------------------------------------------------------------------- presets


def test_every_preset_file_says_what_it_is_and_which_paper_it_follows():
    shipped = {p.name.removesuffix(".yaml") for p in layers._presets_dir().iterdir()}
    assert shipped == set(PRESETS)
    assert PRESETS[0] == "default" and PRESETS[1:] == sorted(PRESETS[1:])
    for name, summary, paper in list_presets():
        assert summary and paper.startswith("arXiv "), f"{name}.yaml needs about: summary, paper"


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_validates_and_has_no_warnings(name):
    cfg = load_config(name)
    assert isinstance(cfg, RunConfig)
    loss = cfg.resolved_loss()
    assert loss == resolve_policy_loss_config(cfg.algo.name, **cfg.loss_overrides())
    assert validate_warnings(cfg) == []
    # the preset is a packaged file too: `preset: NAME` in a YAML gives the same config
    assert config_from_dict({"preset": name}) == cfg


def test_preset_contents_follow_the_papers():
    default, gspo = load_config(None), load_config("gspo")
    assert default == load_config("default")
    assert default.algo.name == "gspo" and default.task.name == "addition"
    assert gspo.algo.num_minibatches == 4
    assert load_config("gspo_token").resolved_loss().ratio_level == "sequence_token"
    assert load_config("gspo_token").algo.num_minibatches == 4

    grpo = load_config("grpo")
    assert grpo.resolved_loss().kl_coef == 0.04 and grpo.model.reference is None

    dapo = load_config("dapo").resolved_loss()  # the paper's objective: no dual clip
    assert (dapo.clip_low, dapo.clip_high, dapo.dual_clip_c, dapo.agg) == (
        0.2,
        0.28,
        None,
        "token-mean",
    )
    verl = load_config("dapo_verl").resolved_loss()  # verl's script adds clip_ratio_c = 10
    assert (verl.clip_low, verl.clip_high, verl.dual_clip_c, verl.agg) == (
        0.2,
        0.28,
        10.0,
        "token-mean",
    )

    dr = load_config("dr_grpo")
    assert dr.algo.advantage == "group_centered"
    assert dr.resolved_loss().max_tokens == dr.rollout.max_new_tokens

    remax, rloo = load_config("remax"), load_config("rloo")
    assert (remax.rollout.group_size, remax.algo.advantage) == (1, "remax")
    assert rloo.algo.advantage == "rloo" and rloo.rollout.group_size >= 2
    for name in PRESETS:  # tiny-model learning rates, not the papers' 1e-6
        assert 1e-5 <= load_config(name).optim.lr <= 3e-4  # tiny-model scale; papers use ~1e-6


def test_presets_that_stand_for_a_papers_run_use_its_settings():
    # GSPO's GRPO baseline (§5.1): clip [0.2, 0.27], no KL; DeepSeekMath's GRPO keeps β = 0.04
    moe_grpo = load_config("grpo_moe_replay")
    loss = moe_grpo.resolved_loss()
    assert (loss.clip_low, loss.clip_high, loss.kl_coef) == (0.2, 0.27, 0.0)
    assert moe_grpo.algo.num_minibatches == 4 and moe_grpo.moe.routing_replay
    # SPPO's 1.5B recipe: temperature 0.6 (train and eval), weight decay 0.01, 2 updates per rollout
    for name in ("sppo", "ppo", "rloo", "remax"):  # SPPO and the baselines it ran alike
        cfg = load_config(name)
        assert (cfg.rollout.temperature, cfg.train.eval_temperature) == (0.6, 0.6), name
        assert cfg.optim.weight_decay == 0.01 and cfg.algo.num_minibatches == 2, name
    # Dr. GRPO's script: one policy update per rollout
    assert load_config("dr_grpo").algo.num_minibatches * load_config("dr_grpo").algo.ppo_epochs == 1
    # scaled-down presets say so in `seqrl presets`
    about = {name: summary for name, summary, _ in list_presets()}
    for name in ("dapo", "dapo_verl", "fipo", "sppo", "ppo", "rloo", "remax", "dr_grpo", "grpo"):
        assert "paper" in about[name] or "scaled down" in about[name], name


# --------------------------------------------------------------------------- inheritance


def test_preset_inheritance_deep_merges_child_wins(tmp_path):
    path = _write(
        tmp_path,
        "preset: default\nrollout:\n  group_size: 4\nalgo:\n  loss:\n    clip_high: 5.0e-4\n",
    )
    cfg = load_config(path)
    base = load_config("default")
    assert cfg.rollout.group_size == 4
    assert cfg.rollout.prompts_per_step == base.rollout.prompts_per_step  # merged, not replaced
    assert cfg.algo.num_minibatches == 4  # from gspo, two presets up
    assert cfg.algo.loss.overrides() == {"clip_high": 5e-4}
    assert cfg.resolved_loss().clip_low == POLICY_LOSS_DEFAULTS["gspo"].clip_low


def test_a_file_without_preset_starts_from_the_schema_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, "seed: 3\n"))
    assert cfg == RunConfig(seed=3)
    assert load_config(_write(tmp_path, "", "empty.yaml")) == RunConfig()


def test_override_replaces_a_mapping_and_can_swap_the_preset():
    cfg = load_config("dr_grpo", ["algo.name=grpo", "algo.loss={}"])
    assert cfg.algo.name == "grpo" and cfg.algo.loss.overrides() == {}
    assert load_config(None, ["preset=rloo"]) == load_config("rloo")


def test_unknown_preset_suggests_the_closest(tmp_path):
    message = _error(_write(tmp_path, "preset: gspoo\n"))
    assert "unknown preset 'gspoo'" in message and "did you mean 'gspo'?" in message
    assert "did you mean 'dr_grpo'?" in _error(None, ["preset=dr_grpoo"])
    assert "did you mean 'remax'?" in _error("remx")


def test_preset_cycle_is_detected(tmp_path, monkeypatch):
    _write(tmp_path, "preset: b\nseed: 1\n", "a.yaml")
    _write(tmp_path, "preset: a\n", "b.yaml")
    monkeypatch.setattr(layers, "_presets_dir", lambda: tmp_path)
    message = _error(None, ["preset=a"])
    assert "preset cycle" in message and "'a' → 'b' → 'a'" in message


def test_about_describes_a_file_and_sets_nothing(tmp_path):
    text = "about:\n  summary: my sweep\n  paper: arXiv 2507.18071\npreset: gspo\n"
    cfg = load_config(_write(tmp_path, text))
    assert cfg == load_config("gspo") and "about" not in cfg.model_dump()
    assert load_config("gspo", ["about.summary=a note"]) == load_config("gspo")


def test_a_misspelt_or_malformed_about_is_an_error(tmp_path):
    message = _error(_write(tmp_path, "abuot:\n  summary: x\n"))
    assert "unknown key 'abuot'; did you mean 'about'?" in message
    path = _write(tmp_path, "about:\n  sumary: x\n", "sumary.yaml")
    message = _error(path)
    assert "unknown key 'about.sumary'; did you mean 'about.summary'?" in message
    assert str(path) in message
    assert "about: expected a mapping" in _error(_write(tmp_path, "about: my run\n", "s.yaml"))
    assert "about.paper: expected a string" in _error(
        _write(tmp_path, "about:\n  paper: [1]\n", "list.yaml")
    )
    assert "(override 'about.sumary=x')" in _error(None, ["about.sumary=x"])


# --------------------------------------------------------------------------- overrides


def test_override_values_are_parsed_as_yaml_with_plain_floats():
    assert parse_override("optim.lr=1e-4") == (("optim", "lr"), 1e-4)
    assert parse_override("optim.lr=3.0e-4")[1] == 3e-4
    assert parse_override("algo.loss.max_tokens=1e3")[1] == 1000.0
    assert parse_override("model.reference=null")[1] is None
    assert parse_override("optim.betas=[0.9, 0.95]")[1] == [0.9, 0.95]
    assert parse_override("name = my-run")[1] == "my-run"
    cfg = load_config(
        None,
        [
            "optim.lr=1e-4",
            "algo.loss.clip_high=4e-4",
            "model.reference=null",
            "optim.betas=[0.8, 0.95]",
            "train.steps=10",
            "name=2024",
        ],
    )
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.resolved_loss().clip_high == 4e-4
    assert cfg.model.reference is None
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.train.steps == 10 and cfg.name == "2024"


def test_floats_in_yaml_files_need_no_dot(tmp_path):
    cfg = load_config(
        _write(tmp_path, "optim:\n  lr: 1e-4\n  eps: 1E-8\nalgo:\n  loss:\n    clip_low: 3.0e-4\n")
    )
    assert (cfg.optim.lr, cfg.optim.eps, cfg.resolved_loss().clip_low) == (1e-4, 1e-8, 3e-4)


def test_malformed_overrides_are_clear():
    assert "not of the form key=value" in _error(None, ["train.steps"])
    assert "write 'train.steps=null'" in _error(None, ["train.steps="])
    assert "not a dotted key" in _error(None, ["train..steps=3"])
    assert "'rollout.group_size' is int" in _error(None, ["rollout.group_size.x=1"])


# --------------------------------------------------------------------------- error messages


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("seeed=1", "unknown key 'seeed'; did you mean 'seed'?"),
        (
            "rollout.group_sise=4",
            "unknown key 'rollout.group_sise'; did you mean 'rollout.group_size'?",
        ),
        (
            "algo.loss.clip_hihg=0.3",
            "unknown key 'algo.loss.clip_hihg'; did you mean 'algo.loss.clip_high'?",
        ),
        ("algo.kl_coef=0.1", "did you mean 'reward.kl_coef' or 'algo.loss.kl_coef'?"),
        ("train.lr=1e-3", "did you mean 'optim.lr' or 'critic.lr'?"),
        ("algo.loss.loss_agg_mode=token-mean", "seqrl calls it 'algo.loss.agg'"),
        ("optim.learning_rate=1e-3", "seqrl calls it 'optim.lr'"),
    ],
)
def test_misspelt_override_key_names_the_closest(override, expected):
    message = _error(None, [override])
    assert expected in message
    assert f"(override {override!r})" in message


def test_misspelt_keys_in_a_file_name_the_closest_and_the_file(tmp_path):
    path = _write(
        tmp_path,
        "preset: gspo\nrolout:\n  group_size: 4\nrollout:\n  group_sise: 4\n"
        "algo:\n  loss:\n    clip_hihg: 4.0e-4\n",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert len(problems) == 3 and all(str(path) in p for p in problems)
    text = "\n".join(problems)
    assert "unknown key 'rolout'; did you mean 'rollout'?" in text
    assert "unknown key 'rollout.group_sise'; did you mean 'rollout.group_size'?" in text
    assert "unknown key 'algo.loss.clip_hihg'; did you mean 'algo.loss.clip_high'?" in text


def test_bad_values_name_the_dotted_key():
    message = _error(None, ["rollout.group_size=abc", "optim.betas=[0.9, x]", "train.steps=0"])
    assert "rollout.group_size: Input should be a valid integer" in message
    assert "optim.betas[1]:" in message
    assert "train.steps: Input should be greater than or equal to 1" in message
    assert "rollout: expected a section" in _error(None, ["rollout=5"])
    assert "did you mean 'addition'?" in _error(None, ["task.name=additon"])
    assert "algo.name: unknown algorithm 'gspoo'; did you mean 'gspo'?" in _error(
        None, ["algo.name=gspoo"]
    )


def test_invalid_loss_values_are_caught_at_load():
    message = _error(None, ["algo.loss.dual_clip_c=1.0001"])
    assert "algo.loss (algo.name='gspo'): dual_clip_c must exceed" in message
    assert "only apply to FIPO" in _error(None, ["algo.loss.decay_rate=8"])
    assert "algo.loss.agg: must be one of" in _error(None, ["algo.loss.agg=token-sum"])
    assert "algo.loss.kl_coef must be >= 0" in _error(None, ["algo.loss.kl_coef=-1"])


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = _write(tmp_path, "seed: 1\nrollout:\n  group_size: [4\n")
    message = _error(path)
    assert str(path) in message and "invalid YAML at line" in message
    assert "duplicate key 'seed'" in _error(_write(tmp_path, "seed: 1\nseed: 2\n", "dup.yaml"))
    assert "top level must be a mapping" in _error(_write(tmp_path, "- 1\n", "list.yaml"))
    assert "config file not found" in _error(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- cross-field checks


def test_dr_grpo_without_max_tokens_suggests_the_override():
    message = _error(None, ["algo.name=dr_grpo", "rollout.max_new_tokens=12"])
    assert "algo.loss.max_tokens=12" in message
    assert "algo.loss.max_tokens=" in _error(None, ["algo.name=dr_grpo"])
    assert "only applies to agg='seq-mean-token-sum-norm'" in _error("dr_grpo", ["algo.name=grpo"])


def test_batch_and_group_checks():
    message = _error(None, ["rollout.prompts_per_step=3", "rollout.group_size=3"])
    assert "algo.num_minibatches=4" in message and "divisors of 9: 1, 3, 9" in message
    message = _error("rloo", ["rollout.group_size=1", "rollout.prompts_per_step=8"])
    assert "algo.advantage='rloo' needs rollout.group_size >= 2" in message
    for preset in ("gspo", "grpo", "dr_grpo"):  # every advantage would be 0
        message = _error(preset, ["rollout.group_size=1", "rollout.prompts_per_step=8"])
        assert "needs rollout.group_size >= 2: a group of one sample is its own mean" in message
        assert "algo.advantage=remax" in message
    assert load_config("remax", ["rollout.group_size=4"]).rollout.group_size == 4


# --------------------------------------------------------------------------- warnings


def _warnings(*overrides) -> str:
    return "\n".join(validate_warnings(load_config("gspo", list(overrides))))


def test_warnings_for_gspo_misconfigurations():
    assert "algo.loss.agg='token-mean'" in _warnings("algo.loss.agg=token-mean")
    assert "~3e-4/4e-4" in _warnings("algo.loss.clip_low=0.2", "algo.loss.clip_high=0.2")
    assert "fully on-policy" in _warnings("algo.num_minibatches=1")
    assert _warnings("algo.num_minibatches=1", "rollout.old_logprobs_source=sampler") == ""
    assert "fully on-policy" in _warnings("algo.name=fipo", "algo.num_minibatches=1")
    assert "fully on-policy" not in _warnings("algo.name=dapo", "algo.num_minibatches=1")


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize("name", PRESETS)
def test_to_yaml_round_trips(tmp_path, name):
    cfg = load_config(name, ["name=run1", "algo.loss.log_ratio_clamp=null", "optim.lr=2e-4"])
    again = load_config(_write(tmp_path, cfg.to_yaml()))
    assert again == cfg and hash(again) == hash(cfg)
    assert again.to_yaml() == cfg.to_yaml()


def test_loss_overrides_keep_only_explicit_fields():
    dapo = load_config("dapo_verl")
    assert dapo.algo.loss.overrides() == {} and dapo.resolved_loss().dual_clip_c == 10.0
    off = load_config("dapo_verl", ["algo.loss.dual_clip_c=null"])
    assert off.algo.loss.overrides() == {"dual_clip_c": None}
    assert off != dapo  # an explicit None is not the same as leaving the preset's 10
    assert off.resolved_loss() == dataclasses.replace(
        POLICY_LOSS_DEFAULTS["dapo"], dual_clip_c=None
    )
    assert off.model_dump()["algo"]["loss"] == {"dual_clip_c": None}


def test_configs_are_frozen_and_strict():
    cfg = load_config(None)
    with pytest.raises(ValidationError):
        cfg.seed = 1
    with pytest.raises(ValidationError):
        RunConfig(sed=1)


def test_run_name_and_with_overrides():
    cfg = load_config(None)
    assert cfg.run_name.startswith("gspo-") and cfg.run_name == cfg.run_name
    named = cfg.with_overrides([f"name={cfg.run_name}"])
    assert named.name == named.run_name == cfg.run_name
    assert named.with_overrides(["name=null"]) == cfg


def test_critic_less_sppo_and_ppo_are_errors_naming_the_key_to_set():
    for name, kind, estimator in (("sppo", "scalar", "sppo"), ("ppo", "token", "gae")):
        with pytest.raises(ConfigError, match=rf"algo.name='{name}'.*set critic.kind={kind}"):
            load_config(None, [f"algo.name={name}"])
        with pytest.raises(
            ConfigError, match=rf"algo.name='{name}'.*critic.kind='none'.*{estimator}"
        ):
            load_config(name, ["critic.kind=none"])
    with pytest.raises(ConfigError, match=r"algo.advantage='gae' needs critic.kind=token"):
        load_config(None, ["algo.advantage=gae"])
    with pytest.raises(ConfigError, match=r"critic.kind='scalar' but algo.advantage='group'"):
        load_config(None, ["critic.kind=scalar"])
    with pytest.raises(ConfigError, match=r"algo.name='sppo' needs algo.advantage=sppo"):
        load_config("sppo", ["algo.advantage=group"])


def test_sppo_with_several_samples_per_prompt_is_allowed_but_warned():
    cfg = load_config("sppo", ["rollout.group_size=4", "rollout.prompts_per_step=16"])
    (warning,) = validate_warnings(cfg)
    assert "rollout.group_size=4" in warning and "N = 1" in warning
    assert validate_warnings(load_config("sppo")) == []


def test_critic_presets_follow_the_papers():
    sppo, small, ppo = load_config("sppo"), load_config("sppo_small_critic"), load_config("ppo")
    assert (sppo.rollout.group_size, sppo.algo.advantage, sppo.critic.kind) == (1, "sppo", "scalar")
    loss = sppo.resolved_loss()
    assert (loss.clip_low, loss.clip_high, loss.dual_clip_c, loss.agg, loss.kl_coef) == (
        0.2,
        0.2,
        3.0,
        "token-mean",
        0.0,
    )
    assert sppo.critic.model == "policy" and sppo.critic.warmup_steps == 0
    assert sppo.critic.lr == 5 * sppo.optim.lr  # the paper's 1.5B ratio: 5e-6 critic, 1e-6 actor
    assert small.critic.model == "builtin:nano" and small.critic.kind == "scalar"
    assert (ppo.algo.advantage, ppo.critic.kind, ppo.critic.gamma, ppo.critic.lam) == (
        "gae",
        "token",
        1.0,
        1.0,
    )
    assert ppo.critic.whiten and ppo.critic.value_clip == 0.5 and ppo.critic.warmup_steps > 0
    assert ppo.critic.token_loss == "mse"
    assert load_config("ppo", ["critic.token_loss=bce"]).critic.token_loss == "bce"  # PPO + BCE


# --------------------------------------------------------------------------- DAPO and FIPO


def test_fipo_presets_take_their_loss_from_core_fipo_presets():
    from seqrl.core import FIPO_PRESETS

    for preset, key in (("fipo", "official_32b"), ("fipo_7b", "7b"), ("fipo_swift", "ms_swift")):
        cfg = load_config(preset)
        assert cfg.algo.fipo_preset == key and cfg.algo.loss.overrides() == {}
        assert cfg.resolved_loss() == resolve_policy_loss_config("fipo", **FIPO_PRESETS[key])
        assert cfg.algo.num_minibatches * cfg.algo.ppo_epochs > 1  # off-policy by default
    # algo.loss still overrides the FIPO preset field by field
    cfg = load_config("fipo_7b", ["algo.loss.safety_threshold=5"])
    assert cfg.resolved_loss().safety_threshold == 5 and cfg.resolved_loss().influence_min == 0.8
    with pytest.raises(
        ConfigError, match=r"algo.fipo_preset='7b' only applies to algo.name='fipo'"
    ):
        load_config("fipo_7b", ["algo.name=dapo"])


def test_dapo_presets_turn_on_the_data_side():
    for preset in ("dapo", "dapo_verl", "fipo"):
        cfg = load_config(preset)
        assert cfg.rollout.dynamic_sampling and cfg.reward.overlong_buffer is not None
        assert cfg.reward.incorrect == -1.0 and cfg.resolved_loss().kl_coef == 0
        assert cfg.resolved_loss().agg == "token-mean"
    assert load_config("dapo").optim.warmup_steps == 20  # the paper; verl's script: 10
    assert load_config("dapo_verl").optim.warmup_steps == 10


def test_overlong_window_must_fit_the_budget():
    with pytest.raises(
        ConfigError, match=r"reward.overlong_buffer=11 exceeds the generation budget 10"
    ):
        load_config("dapo", ["reward.overlong_buffer=11"])
    # the task's own budget counts when rollout.max_new_tokens is null (addition, 3 digits: 6)
    with pytest.raises(ConfigError, match="budget 6"):
        load_config("dapo", ["rollout.max_new_tokens=null", "reward.overlong_buffer=7"])


def test_fully_on_policy_fipo_warns():
    warnings = validate_warnings(load_config("fipo", ["algo.num_minibatches=1"]))
    assert any("FIPO's future-KL weights are all 1" in w for w in warnings)
    sampler = load_config("fipo", ["algo.num_minibatches=1", "rollout.old_logprobs_source=sampler"])
    assert validate_warnings(sampler) == []


def test_an_inert_fipo_safety_ablation_warns():
    """At FIPO's 32B settings the safety threshold equals the dual-clip c = 10: switching the
    rule off there changes no gradient (the core test pins it), so the config says so."""
    (warning,) = validate_warnings(load_config("fipo", ["algo.loss.safety_threshold=null"]))
    assert "safety_threshold=None" in warning and "no update" in warning
    assert validate_warnings(load_config("fipo", ["algo.loss.safety_threshold=3"])) == []
    assert validate_warnings(load_config("fipo_7b", ["algo.loss.safety_threshold=null"])) == []


def test_dynamic_sampling_with_one_sample_per_prompt_warns():
    cfg = load_config("remax", ["rollout.dynamic_sampling=true"])
    assert any("keeps every group" in w for w in validate_warnings(cfg))
    assert not any("keeps every group" in w for w in validate_warnings(load_config("dapo")))


# --------------------------------------------------------------------------- your own data


def test_the_verifier_is_a_builtin_name_or_a_function():
    mine = load_config(None, ["task.name=file", "task.train_file=d.jsonl", "task.reward=m:score"])
    assert mine.task.reward == "m:score"
    assert load_config(None, ["task.reward=exact"]).task.reward == "exact"
    message = _error(None, ["task.reward=exakt"])
    assert "task.reward: must be one of math, code, exact or your own function" in message
    assert "did you mean 'exact'?" in message
    message = _error(None, ["task.name=addition", "task.reward=my_rewards:score"])
    assert "applies to task.name='file'" in message
    cfg = load_config(
        None,
        [
            "task.name=file",
            "task.train_file=d.jsonl",
            "task.reward=my_rewards:score",
            "reward.terms=[{fn: format}]",
        ],
    )
    assert any("the format term is always 0" in w for w in validate_warnings(cfg))


def test_relative_paths_in_a_yaml_resolve_against_its_folder(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "train.jsonl").write_text("{}\n")
    (project / "my-model").mkdir()
    path = _write(
        project,
        "task: {name: file, train_file: data/train.jsonl, test_file: data/missing.jsonl}\n"
        "model: {policy: my-model, reference: org/hub-model}\n"
        "output_dir: runs\n",
    )
    monkeypatch.chdir(tmp_path)  # somewhere else
    cfg = load_config(path)
    assert cfg.task.train_file == str(project / "data" / "train.jsonl")
    assert cfg.task.test_file == str(project / "data" / "missing.jsonl")  # errors name this
    assert cfg.model.policy == str(project / "my-model")
    assert cfg.model.reference == "org/hub-model"  # no such folder there: a Hub id, kept
    assert cfg.output_dir == "runs"  # where runs go stays relative to the working directory
    # overrides are command-line values: relative to the working directory, untouched
    assert load_config(path, ["model.policy=other"]).model.policy == "other"
    # a Hub dataset id that is no file next to the YAML is kept as it is
    hub = _write(project, "task: {name: file, train_file: openai/gsm8k}\n", "hub.yaml")
    assert load_config(hub).task.train_file == "openai/gsm8k"


def test_override_values_that_yaml_misreads_say_to_quote_them():
    message = _error(None, ["task.prompt_template=Q: {prompt}"])
    assert "YAML read the value as a mapping: quote it" in message
    assert """--set 'task.prompt_template="..."'""" in message
    message = _error(None, ["task.prompt_template={prompt} ="])
    assert "invalid YAML" in message and "needs quotes" in message
    good = load_config(None, ['task.prompt_template="Q: {prompt} = ?"'])
    assert good.task.prompt_template == "Q: {prompt} = ?"


def test_resume_may_change_cadence_and_logging_only(tmp_path):
    from seqrl.config import resume_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(load_config(None, ["train.steps=10"]).to_yaml())
    cfg = resume_config(run, ["train.steps=30", "train.eval_every=5", "log.wandb=true"])
    assert (cfg.train.steps, cfg.train.eval_every, cfg.log.wandb) == (30, 5, True)
    with pytest.raises(ConfigError) as info:
        resume_config(run, ["optim.lr=1", "train.steps=30", "rollout.group_size=2"])
    problems = info.value.problems
    assert len(problems) == 2
    assert "optim.lr cannot change when resuming" in problems[0]
    assert "train.steps" in problems[0] and str(run / "final") in problems[0]
    assert "rollout.group_size cannot change" in problems[1]
    with pytest.raises(FileNotFoundError, match=r"no config\.yaml"):
        resume_config(tmp_path)
