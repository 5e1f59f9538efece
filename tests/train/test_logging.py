"""Run logging: metrics.jsonl, and TensorBoard event files with the same scalars."""

import pytest
import torch

from seqrl.train.dist import SINGLE, reduce_sums
from seqrl.train.metrics import MetricAccumulator, RunLogger, read_metrics


def test_tensorboard_events_carry_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = RunLogger(tmp_path, tensorboard=True)
    logger.log(1, {"reward/mean": 0.25, "policy/kl_old": float("nan")})
    logger.log(2, {"reward/mean": 0.5, "eval/greedy_acc": 0.75})
    logger.close()

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    reward = [(e.step, e.value) for e in events.Scalars("reward/mean")]
    assert reward == [(1, 0.25), (2, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars("eval/greedy_acc")] == [(2, 0.75)]
    assert "policy/kl_old" not in events.Tags()["scalars"]  # non-finite values are not plotted
    rows = read_metrics(tmp_path)  # while metrics.jsonl keeps every value, NaN as "nan"
    assert rows[0] == {"step": 1, "reward/mean": 0.25, "policy/kl_old": "nan"}
    assert rows[1] == {"step": 2, "reward/mean": 0.5, "eval/greedy_acc": 0.75}


def test_tensorboard_off_writes_no_events(tmp_path):
    logger = RunLogger(tmp_path, tensorboard=False)
    logger.log(1, {"reward/mean": 0.25})
    logger.close()
    assert not (tmp_path / "tb").exists()
    assert read_metrics(tmp_path) == [{"step": 1, "reward/mean": 0.25}]


def test_micro_batch_metrics_are_means_except_extremes():
    acc = MetricAccumulator()
    for ratio_max, ratio_min, mean in [(1.2, 0.9, 1.0), (1.5, 0.7, 2.0), (1.1, 0.95, 6.0)]:
        acc.add(
            {
                "policy/ratio_max": torch.tensor(ratio_max),
                "policy/ratio_min": torch.tensor(ratio_min),
                "policy/ratio_mean": torch.tensor(mean),
            }
        )
    got = acc.means()
    assert got["policy/ratio_max"] == pytest.approx(1.5)
    assert got["policy/ratio_min"] == pytest.approx(0.7)
    assert got["policy/ratio_mean"] == pytest.approx(3.0)
    assert reduce_sums(acc.sums(), SINGLE) == pytest.approx(got)
