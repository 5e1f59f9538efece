"""Config keys of the scale-out path: algo.mismatch, rollout.engine / rollout.vllm; rank maths."""

import pytest

from seqrl.config import ConfigError, load_config, validate_warnings
from seqrl.train.dist import DistInfo, shard, shard_bounds, uneven_bounds


def test_mismatch_keys_are_validated_with_their_options():
    cfg = load_config(None, ["algo.mismatch.correction=mask", "algo.mismatch.level=sequence",
                             "algo.mismatch.cap=3"])  # fmt: skip
    assert (cfg.algo.mismatch.correction, cfg.algo.mismatch.level, cfg.algo.mismatch.cap) == (
        "mask",
        "sequence",
        3.0,
    )
    with pytest.raises(
        ConfigError, match=r"algo\.mismatch\.correction: must be one of none, truncate, mask"
    ):
        load_config(None, ["algo.mismatch.correction=tis"])
    with pytest.raises(ConfigError, match=r"algo\.mismatch\.cap"):
        load_config(None, ["algo.mismatch.cap=0"])
    with pytest.raises(ConfigError, match=r"did you mean 'algo\.mismatch\.cap'"):
        load_config(None, ["algo.mismatch.cpa=2"])
    default = load_config(None)
    assert default.algo.mismatch.correction == "auto"
    assert default.resolved_mismatch().correction == "none"  # off unless asked for, or async


def test_auto_mismatch_correction_turns_on_with_stale_samples_at_the_matching_level():
    def resolved(*overrides):
        m = load_config(None, list(overrides)).resolved_mismatch()
        return m.correction, m.level

    assert resolved() == ("none", "token")
    assert resolved("rollout.max_staleness=1") == ("truncate", "sequence_mean")  # GSPO
    assert resolved("preset=gspo_token", "rollout.max_staleness=2") == ("truncate", "sequence_mean")
    assert resolved("preset=dapo", "rollout.max_staleness=1") == ("truncate", "token")
    assert resolved("preset=dapo", "rollout.max_staleness=1", "algo.mismatch.correction=none",
                    "algo.mismatch.level=sequence") == ("none", "sequence")  # fmt: skip
    with pytest.raises(ConfigError, match=r"rollout\.max_staleness"):
        load_config(None, ["rollout.max_staleness=-1"])
    with pytest.raises(ConfigError, match="cannot sample ahead"):
        load_config(None, ["rollout.max_staleness=1", "rollout.engine=vllm"])
    cfg = load_config(None, ["rollout.max_staleness=1", "rollout.old_logprobs_source=sampler"])
    assert any("centred on the stale policy" in w for w in validate_warnings(cfg))


def test_a_correction_with_sampler_logprobs_warns_that_it_does_nothing():
    cfg = load_config(None, ["algo.mismatch.correction=truncate",
                             "rollout.old_logprobs_source=sampler"])  # fmt: skip
    assert any("does nothing" in w for w in validate_warnings(cfg))
    assert not any("mismatch" in w for w in validate_warnings(load_config(None)))


def test_prompts_shard_evenly_or_fail_with_the_fix():
    items = list(range(8))
    assert [shard(items, DistInfo(r, 2)) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        shard_bounds(8, DistInfo(1, 3))


@pytest.mark.parametrize(("n", "world"), [(10, 3), (2, 4), (8, 2), (0, 2)])
def test_uneven_shares_cover_every_item_once(n, world):
    bounds = [uneven_bounds(n, DistInfo(r, world)) for r in range(world)]
    covered = [i for lo, hi in bounds for i in range(lo, hi)]
    assert covered == list(range(n))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1
