"""Routing Replay and routing churn through the RL update of an MoE policy (builtin:tiny-moe)."""

import copy
import json

import pytest
import torch

import seqrl.core as C
from seqrl.config import ConfigError, load_config, validate_warnings
from seqrl.models import load_policy
from seqrl.models.moe import find_routers
from seqrl.rollout import HFSampler
from seqrl.tasks import get_task
from seqrl.train.forward import joint_inputs
from seqrl.train.plots import plot_run
from seqrl.train.routing import RolloutRouting
from seqrl.train.step import UpdateSettings, batch_logprobs, response_logprobs, update_policy
from seqrl.train.trainer import Trainer
from support import ExpertsObserver, train_cli


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, tok = load_policy("builtin:tiny-moe")
    task = get_task("addition", digits=2, seed=1)
    prompts = [e.prompt for e in task.examples("train", 3)] + ["1+2="]  # ragged prompt lengths
    batch = HFSampler(model, tok, max_new_tokens=6, temperature=1.0).generate(prompts, group_size=3)
    return model, batch


def _perturb_routers(model, scale=1.0):
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for router in find_routers(model):
            router.weight.add_(scale * torch.randn(router.weight.shape, generator=gen))


def _real_tokens_in_batch_order(batch, row):
    """Bool [Lp + T] of row's real tokens in the batch layout (prompt columns, then response)."""
    return torch.cat([batch.prompt_mask[row], batch.response_mask[row]])


@pytest.mark.parametrize("replay", [True, False])
def test_training_forward_uses_the_recorded_routing_only_under_replay(setup, replay):
    """Record at θ_old in micro-batches of 5, change the routers, forward other rows together.

    Replay: every real token of every row goes through exactly the experts recorded for it, though
    its batch neighbours and column trim differ; off: the changed routers route by themselves.
    """
    model, batch = copy.deepcopy(setup[0]), setup[1]
    routing = RolloutRouting(model, replay=replay)
    batch_logprobs(model, batch, temperature=1.0, micro_batch_size=5, routing=routing)
    routing.begin_updates()
    _perturb_routers(model)
    routing.optimizer_stepped()
    rows = torch.tensor([7, 0, 11, 3])
    observer = ExpertsObserver(model)
    with torch.no_grad():
        response_logprobs(model, batch, rows, temperature=1.0, routing=routing)
    observer.remove()
    inputs, _, _ = joint_inputs(batch, rows)
    real = inputs["attention_mask"].bool()  # [b, Lj]
    b, Lj = real.shape
    differs = 0
    for layer, used in enumerate(observer.seen):
        used = used.view(b, Lj, -1)
        for i, row in enumerate(rows.tolist()):
            recorded = routing.record[layer, row][_real_tokens_in_batch_order(batch, row)].long()
            assert (recorded >= 0).all()  # every real token was recorded
            got = used[i][real[i]]
            if replay:
                assert torch.equal(got, recorded)
            differs += int(C.routing_set_changed(recorded, got).sum())
    assert (differs == 0) == replay
    assert routing.metrics()["moe/routing_churn"] > 0  # the routers' own choice did move


def _update(model, batch, routing, *, lr, num_minibatches=3, micro=4, after_step=None):
    B = batch.response_ids.shape[0]
    adv = C.group_advantages(torch.arange(B).remainder(2).float(), 3)
    old = batch_logprobs(model, batch, temperature=1.0, micro_batch_size=5, routing=routing)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    if after_step is not None:
        opt.register_step_post_hook(lambda *_: after_step())
    settings = UpdateSettings("grpo", {"kl_coef": 0.0}, num_minibatches, 1, micro, 1e9, 1.0)
    metrics, skipped = update_policy(
        model,
        opt,
        batch,
        adv,
        old,
        None,
        settings,
        torch.Generator().manual_seed(7),
        routing=routing,
    )
    assert skipped == 0
    return metrics


def test_churn_is_exactly_zero_without_a_parameter_change(setup):
    model, batch = copy.deepcopy(setup[0]), setup[1]
    metrics = _update(model, batch, RolloutRouting(model, replay=False), lr=0.0)
    churn = {k: v for k, v in metrics.items() if k.startswith("moe/routing_churn")}
    assert len(churn) == 1 + 4 and all(v == 0.0 for v in churn.values())
    assert metrics["moe/expert_change"] == 0.0 and metrics["moe/load_cv"] > 0
    moved = copy.deepcopy(setup[0])
    metrics = _update(moved, batch, RolloutRouting(moved, replay=False), lr=20.0)
    assert metrics["moe/routing_churn"] > 0  # a big step does move the routing


def test_churn_metric_equals_a_direct_comparison(setup):
    """moe/routing_churn after one update = set changes between two plain forwards, by hand."""
    model, batch = copy.deepcopy(setup[0]), setup[1]
    B = batch.response_ids.shape[0]
    all_rows = torch.arange(B)

    def own_routing():  # [layers, B, Lj, k] of one forward of all rows, no seqrl bookkeeping
        obs = ExpertsObserver(model)
        with torch.no_grad():
            model(**joint_inputs(batch, all_rows)[0], use_cache=False)
        obs.remove()
        inputs = joint_inputs(batch, all_rows)[0]
        return torch.stack([s.view(B, inputs["input_ids"].shape[1], -1) for s in obs.seen])

    before = own_routing()
    snapshots = []  # the routing at θ after the first optimizer step
    metrics = _update(
        model,
        batch,
        RolloutRouting(model, replay=True),
        lr=3.0,
        num_minibatches=2,
        after_step=lambda: snapshots.append(own_routing()),
    )
    # the second minibatch was scored after one step; recompute its churn from two plain forwards
    after = snapshots[0]
    order = torch.randperm(B, generator=torch.Generator().manual_seed(7))
    second = order.chunk(2)[1]
    _, _, resp_mask = joint_inputs(batch, all_rows)
    T = resp_mask.shape[1]
    Lj = before.shape[2]
    changed, pairs = torch.zeros(before.shape[0]), 0
    for row in second.tolist():
        for t in range(T):
            if resp_mask[row, t]:
                pos = Lj - T - 1 + t  # the output that scores response token t
                pairs += 1
                for layer in range(before.shape[0]):
                    old = set(before[layer, row, pos].tolist())
                    new = set(after[layer, row, pos].tolist())
                    changed[layer] += old != new
    expected = changed / pairs
    assert expected.sum() > 0
    got = torch.tensor([metrics[f"moe/routing_churn/layer_{i}"] for i in range(len(expected))])
    torch.testing.assert_close(got, expected.float(), rtol=0, atol=1e-6)


def test_routing_without_replay_leaves_the_update_bit_identical(setup):
    plain, batch = copy.deepcopy(setup[0]), setup[1]
    hooked = copy.deepcopy(setup[0])
    _update(plain, batch, None, lr=3.0)
    metrics = _update(hooked, batch, RolloutRouting(hooked, replay=False), lr=3.0)
    assert "moe/routing_churn" in metrics
    for p, q in zip(plain.parameters(), hooked.parameters(), strict=True):
        assert torch.equal(p, q)


def test_replay_of_a_single_on_policy_minibatch_is_the_plain_update(setup):
    """θ = θ_old in the only minibatch: the recorded routing is the router's own choice."""
    plain, batch = copy.deepcopy(setup[0]), setup[1]
    replayed = copy.deepcopy(setup[0])
    _update(plain, batch, None, lr=3.0, num_minibatches=1, micro=12)
    _update(replayed, batch, RolloutRouting(replayed, replay=True), lr=3.0, num_minibatches=1)
    # the two runs use different micro-batch sizes, so float sums differ in order (up to ~2e-7
    # with two threads); a replayed expert that differed would move weights by ~1e-1
    for p, q in zip(plain.parameters(), replayed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_replay_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="old_logprobs_source='recompute'"):
        load_config("gspo", ["moe.routing_replay=true", "rollout.old_logprobs_source=sampler"])
    with pytest.raises(ConfigError, match=r"model\.gradient_checkpointing"):
        load_config("gspo", ["moe.routing_replay=true", "model.gradient_checkpointing=true"])
    cfg = load_config(
        "gspo", ["moe.routing_replay=true", "model.policy=builtin:nano", f"output_dir={tmp_path}"]
    )
    with pytest.raises(ValueError, match="no supported MoE router"):
        Trainer(cfg, progress=False)
    on_policy = load_config("grpo_moe_replay", ["algo.num_minibatches=1"])
    assert any("nothing to replay" in w for w in validate_warnings(on_policy))


def test_reroute_sets_the_churn_and_replay_undoes_its_effect(setup):
    """moe.reroute_frac: a chosen churn on top of the real one; replay still uses the recording."""
    model, batch = copy.deepcopy(setup[0]), setup[1]
    metrics = _update(model, batch, RolloutRouting(model, replay=False, reroute_frac=0.4), lr=0.0)
    assert abs(metrics["moe/routing_churn"] - 0.4) < 0.15  # no real churn at lr 0: all injected
    torch.testing.assert_close(
        metrics["moe/expert_change"], metrics["moe/routing_churn"] / 2, rtol=0, atol=1e-6
    )  # one expert of two traded
    replayed, rerouted_replayed = copy.deepcopy(setup[0]), copy.deepcopy(setup[0])
    _update(replayed, batch, RolloutRouting(replayed, replay=True), lr=3.0)
    out = _update(
        rerouted_replayed,
        batch,
        RolloutRouting(rerouted_replayed, replay=True, reroute_frac=0.4),
        lr=3.0,
    )
    assert out["moe/routing_churn"] > 0.2  # the routers' own (re-routed) choice is what is compared
    # padding columns (never recorded) keep the re-routed choice: an expert then multiplies a
    # different number of rows, which can change float rounding (~1e-7), not the experts used
    for p, q in zip(replayed.parameters(), rerouted_replayed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    plain, rerouted = copy.deepcopy(setup[0]), copy.deepcopy(setup[0])
    _update(plain, batch, RolloutRouting(plain, replay=False), lr=3.0)
    _update(rerouted, batch, RolloutRouting(rerouted, replay=False, reroute_frac=0.4), lr=3.0)
    assert any(
        not torch.equal(p, q)
        for p, q in zip(plain.parameters(), rerouted.parameters(), strict=True)
    )


def test_reroute_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"moe\.reroute_frac re-routes the forwards after"):
        load_config("grpo_moe_replay", ["moe.reroute_frac=0.1", "algo.num_minibatches=1"])
    with pytest.raises(ConfigError, match=r"moe.reroute_frac cannot .*gradient_checkpointing"):
        load_config("gspo_moe", ["moe.reroute_frac=0.1", "model.gradient_checkpointing=true"])
    with pytest.raises(ConfigError, match=r"moe\.reroute_frac: .*old_logprobs_source='recompute'"):
        load_config("gspo_moe", ["moe.reroute_frac=0.1", "rollout.old_logprobs_source=sampler"])
    with pytest.raises(ConfigError, match="less than 1"):
        load_config("gspo_moe", ["moe.reroute_frac=1"])
    cfg = load_config(
        "gspo", ["moe.reroute_frac=0.1", "model.policy=builtin:nano", f"output_dir={tmp_path}"]
    )
    with pytest.raises(ValueError, match="re-routes an MoE policy's tokens"):
        Trainer(cfg, progress=False)


@pytest.mark.slow
def test_cli_trains_an_moe_policy_with_routing_replay_and_plots_churn(tmp_path):
    done = train_cli(
        [
            "preset=grpo_moe_replay",
            "model.policy=builtin:tiny-moe",
            "rollout.prompts_per_step=4",
            "rollout.group_size=4",
            "task.eval_size=8",
            "train.eval_samples=0",
            "train.steps=2",
            "log.tensorboard=false",
            f"output_dir={tmp_path}",
            "name=run",
        ]
    )
    assert done.returncode == 0, done.stderr + done.stdout
    run = tmp_path / "run"
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [s for s in steps if "moe/routing_churn" in s]
    assert len(trained) == 2
    for s in trained:
        assert 0 <= s["moe/routing_churn"] <= 1 and "moe/routing_churn/layer_3" in s
        assert s["moe/load_cv"] >= 0 and s["moe/load_max"] >= 1
    assert "routing_replay: true" in (run / "config.yaml").read_text()
    written = {p.name for p in plot_run(run)}
    assert {"moe_churn.png", "moe_load.png"} <= written
