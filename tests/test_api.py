"""The Python API (seqrl.RLTrainer, SFTTrainer, evaluate, load_config): rows and callables in,
a run's metrics and final model out, the Hub push against a local stand-in."""

import json
import subprocess
import sys

import pytest

import seqrl
from seqrl.hub import HubPushError, push_folder
from support import LocalHub

ROWS = [
    {"prompt": f"{a}+{b}=", "answer": str(a + b), "kind": "small" if a + b < 10 else "big"}
    for a in range(10)
    for b in range(10)
]
NANO = {
    "model": {"policy": "builtin:nano"},
    "rollout": {"prompts_per_step": 4, "group_size": 2, "max_new_tokens": 3},
    "algo": {"num_minibatches": 2},
    "task": {"eval_size": 8, "group_by": "kind"},
    "train": {"steps": 1, "eval_samples": 2, "eval_every": 0},
    "log": {"tensorboard": False},
}


def test_import_seqrl_stays_light_and_names_the_api():
    code = "import sys, seqrl; print('torch' in sys.modules, 'RLTrainer' in seqrl.__all__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True"]
    assert {"RLTrainer", "SFTTrainer", "evaluate", "load_config"} <= set(dir(seqrl))
    with pytest.raises(AttributeError, match="no attribute 'Trainer'"):
        seqrl.Trainer  # noqa: B018


def test_rows_and_a_callable_reward_train_evaluate_and_resume(tmp_path):
    seen = []

    def first_digit(completion, example):  # a function of this test: usable in this process
        seen.append(completion)
        return float(completion[:1] == example.answer[:1])

    config = {**NANO, "output_dir": str(tmp_path / "runs"), "name": "rows"}
    run = seqrl.RLTrainer(config, train_data=ROWS, reward=first_digit).train()
    assert run.run_dir == tmp_path / "runs" / "rows" and (run.final_model / "config.json").exists()
    assert [r["step"] for r in run.metrics if "reward/mean" in r] == [1]
    assert "eval/greedy_acc/big" in run.evals[-1] and run.summary["steps"] == 1
    assert seen  # the callable was the verifier
    saved = seqrl.load_config(run.run_dir / "config.yaml")
    assert saved.task.reward.startswith("callable:") and saved.task.test_file is None
    data_file = saved.task.train_file  # the rows, written once as JSONL beside the runs
    assert data_file.startswith(str(tmp_path / "runs" / ".seqrl-data"))
    assert [json.loads(x) for x in open(data_file)] == [dict(sorted(r.items())) for r in ROWS]

    report = seqrl.evaluate(run.final_model, run.config, k=2)
    assert 0.0 <= report["greedy_acc"] <= 1.0 and "pass@2" in report and "greedy_acc/big" in report
    on_rows = seqrl.evaluate(run.final_model, data=ROWS[:5], reward="exact", k=1)
    assert on_rows["greedy_acc"] == pytest.approx(on_rows["greedy_acc"]) and "avg@1" in on_rows

    more = seqrl.RLTrainer.resume(run.run_dir, ["train.steps=2"], functions=[first_digit])
    assert [r["step"] for r in more.train().metrics if "reward/mean" in r] == [1, 2]


def test_sft_trainer_reports_held_out_accuracy_before_and_after(tmp_path):
    warm = seqrl.SFTTrainer(
        {**NANO, "output_dir": str(tmp_path)},
        train_data=ROWS,
        reward="exact",
        out=tmp_path / "warm",
        steps=2,
        batch_size=8,
    ).train()
    assert warm.model_dir == tmp_path / "warm" and (warm.model_dir / "config.json").exists()
    assert 0.0 <= warm.greedy_acc_start <= 1.0 and set(warm.groups) <= {"small", "big"}


def test_config_dicts_take_functions_and_paths_and_refuse_other_objects(tmp_path):
    def score(completion, example):
        return 1.0

    cfg = seqrl.load_config(
        {
            "task": {"name": "file", "train_file": "rows.jsonl", "reward": score},
            "reward": {"terms": [{"fn": score, "weight": 0.5}]},
        },
        ["train.steps=3"],
    )
    assert cfg.task.reward == cfg.reward.terms[0].fn and cfg.task.reward.startswith("callable:")
    assert cfg.train.steps == 3
    assert seqrl.load_config({"output_dir": tmp_path}).output_dir == str(tmp_path)
    with pytest.raises(TypeError, match="not a YAML value"):
        seqrl.load_config({"seed": object()})
    with pytest.raises(TypeError, match=r"DatasetDict|dict of fields"):
        seqrl.RLTrainer(NANO, train_data=["not a row"])


def test_the_final_model_is_pushed_to_the_hub_stand_in(tmp_path, monkeypatch):
    config = {**NANO, "output_dir": str(tmp_path), "name": "pushed", "hub": {"repo_id": "me/nano"}}
    with LocalHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_local_stand_in")
        run = seqrl.RLTrainer(config, train_data=ROWS, reward="exact").train()
    repo = hub.repos["me/nano"]
    local = {p.name: p.read_bytes() for p in run.final_model.iterdir() if p.is_file()}
    assert repo["files"] == local and "model.safetensors" in local
    assert repo["private"] is True and repo["commits"] == ["seqrl run pushed"]
    assert hub.unexpected == []


def test_a_failed_push_keeps_the_model_and_says_how_to_push_it(tmp_path, monkeypatch):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    with LocalHub() as hub:
        endpoint = hub.endpoint  # closed after the block: nothing listens there any more
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", "hf_local_stand_in")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    with pytest.raises(HubPushError, match=r"'me/x' failed.*saved in .*final.*hf upload me/x"):
        push_folder(tmp_path / "final", "me/x")


def test_a_datasets_dataset_is_data_and_a_dataset_dict_asks_for_a_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS[::25])  # both kinds
    report = seqrl.evaluate("builtin:nano", NANO, data=ds, reward="exact", k=1)
    assert {"greedy_acc", "avg@1", "greedy_acc/small", "greedy_acc/big"} <= set(report)
    both = datasets.DatasetDict({"train": ds, "test": ds})
    with pytest.raises(TypeError, match=r"DatasetDict with splits \['train', 'test'\]: pick one"):
        seqrl.RLTrainer({**NANO, "output_dir": str(tmp_path)}, train_data=both)
