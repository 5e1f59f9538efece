"""Weights & Biases (offline) and MLflow (a local file store) get every metric of a real run,
and a resumed run continues the same tracker runs. Skipped where the packages are not installed
(they are not in the test extra: together they pull in about 200 MB)."""

import glob
import json
import struct
import time

import pytest

from seqrl.config import ConfigError, load_config
from seqrl.train.metrics import TRACKER_IDS, mlflow_key, read_metrics
from seqrl.train.trainer import Trainer


def _wandb_history(run_dir) -> list[dict]:
    """The history records of the offline run files under ``run_dir/wandb``.

    A ``.wandb`` file is a LevelDB-style log (7-byte header, then 32 KiB blocks of records with
    a 7-byte checksum/length/type header) of protobuf ``Record`` messages.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for path in sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))):
        data, pos, block, buf = open(path, "rb").read(), 7, 32768, b""
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # the rest of a block is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if kind == 0 and length == 0:
                pos += block - pos % block
                continue
            buf += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a full record, or the last piece of one
                record = pb.Record()
                record.ParseFromString(buf)
                buf = b""
                if record.WhichOneof("record_type") == "history":
                    items = record.history.item  # a name with "/" comes as a nested key
                    out.append(
                        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                    )
    return out


def _written(run_dir, last_step: int, timeout: float = 30.0) -> list[dict]:
    """The wandb history once its last record is on disk (wandb-core writes the offline file
    from its own process, so the end of a run can reach the file a moment after finish())."""
    deadline = time.monotonic() + timeout
    while True:
        history = _wandb_history(run_dir)
        if any(h["_step"] == last_step for h in history) or time.monotonic() > deadline:
            return history
        time.sleep(0.2)


def _cfg(fast_overrides, *extra):
    return load_config(None, [*fast_overrides, "train.steps=2", *extra])


@pytest.mark.slow
def test_wandb_offline_gets_every_logged_metric_and_resume_continues_the_run(
    fast_overrides, monkeypatch
):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(fast_overrides, "log.wandb=true", "log.wandb_project=own-data")
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    run_id = json.loads((trainer.run_dir / TRACKER_IDS).read_text())["wandb"]
    history = _written(trainer.run_dir, 2)
    logged = read_metrics(trainer.run_dir)
    assert [h["_step"] for h in history] == [0, 1, 2]  # eval at 0, steps 1 and 2 (+ final eval)
    step1 = next(r for r in logged if r["step"] == 1 and "reward/mean" in r)
    assert history[1]["reward/mean"] == pytest.approx(step1["reward/mean"])
    assert history[2]["eval/greedy_acc"] == pytest.approx(logged[-1]["eval/greedy_acc"])

    Trainer.resume(trainer.run_dir, ["train.steps=3"], progress=False).fit()
    assert json.loads((trainer.run_dir / TRACKER_IDS).read_text())["wandb"] == run_id
    runs = glob.glob(str(trainer.run_dir / "wandb" / "offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(run_id) for r in runs)  # one run id, two sessions
    assert [h["_step"] for h in _written(trainer.run_dir, 3)] == [0, 1, 2, 3]


@pytest.mark.slow
def test_mlflow_file_store_gets_every_logged_metric_and_resume_continues_the_run(
    fast_overrides, tmp_path, monkeypatch
):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants it for file stores
    uri = (tmp_path / "mlruns").as_uri()
    cfg = _cfg(fast_overrides, "log.mlflow=true", f"log.mlflow_tracking_uri={uri}")
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    run_id = json.loads((trainer.run_dir / TRACKER_IDS).read_text())["mlflow"]
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["algo.name"] == "gspo" and run.data.params["train.steps"] == "2"
    logged = read_metrics(trainer.run_dir)
    history = {m.step: m.value for m in client.get_metric_history(run_id, "reward/mean")}
    expected = {r["step"]: r["reward/mean"] for r in logged if "reward/mean" in r}
    assert history == pytest.approx(expected)
    passed = client.get_metric_history(run_id, mlflow_key("eval/pass@2"))  # '@' is refused
    assert mlflow_key("eval/pass@2") == "eval/pass_at_2" and [m.step for m in passed] == [0, 2]

    Trainer.resume(trainer.run_dir, ["train.steps=3"], progress=False).fit()
    steps = [m.step for m in client.get_metric_history(run_id, "reward/mean")]
    assert sorted(steps) == [1, 2, 3]  # the same MLflow run goes on
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_a_tracker_that_is_not_installed_is_a_config_error(fast_overrides, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):  # as if `pip install wandb` had not been run
        if name == "wandb" or name.startswith("wandb."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    trainer = Trainer(_cfg(fast_overrides, "log.wandb=true"), progress=False)
    with pytest.raises(
        ConfigError, match=r"log.wandb is true but wandb is not installed.*seqrl\[wandb\]"
    ):
        trainer.fit()


def test_an_mlflow_store_that_cannot_open_is_a_config_error(fast_overrides):
    pytest.importorskip("mlflow")
    trainer = Trainer(
        _cfg(fast_overrides, "log.mlflow=true", "log.mlflow_tracking_uri=nosuchscheme://x"),
        progress=False,
    )
    with pytest.raises(ConfigError, match=r"log.mlflow: could not start the mlflow run"):
        trainer.fit()
