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


def test_several_runs_overlay_in_one_plot_per_panel(tmp_path):
    from seqrl.train.plots import plot_runs

    for name, reward in (("gspo", 0.5), ("grpo", 0.25)):
        logger = RunLogger(tmp_path / name, tensorboard=False)
        (tmp_path / name).mkdir()
        logger.log(0, {"eval/greedy_acc": reward, "eval/greedy_acc/first": reward})
        logger.log(1, {"reward/mean": reward})
    written = plot_runs([tmp_path / "gspo", tmp_path / "grpo"], tmp_path / "compare")
    names = sorted(p.name for p in written)
    assert names == ["accuracy.png", "accuracy_by_group.png", "reward.png"]
    with pytest.raises(FileNotFoundError, match=r"no metrics\.jsonl"):
        plot_runs([tmp_path / "gspo", tmp_path], tmp_path / "x")
