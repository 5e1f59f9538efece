"""The training loop, one module per concern (imports point down this list, never up):

trainer.py     Trainer: fit, one RL step (train_step), evaluate, checkpoints and resume
rollout_worker.py  asynchronous rollouts: the worker process, its shared-memory weight slots
builders.py    config → policy, reference, critic, LoRA, sampler, optimisers, schedules, data
rebalance.py   dynamic sampling over several processes: kept groups rebalanced
sampling.py    the data side of a step: prompt order, rollout, scores, reward shaping, filters
step.py        advantages and the policy update (the clipped loss per micro-batch)
critic.py      SPPO's scalar and PPO's token critic: values, advantages, the critic update
optimize.py    the one optimiser pass (minibatches × micro-batches) policy and critics share
forward.py     forwards over a rollout batch: log-probs, shared-prefix logits, critic values
routing.py     an MoE policy's routing record and Routing Replay
dist.py        everything rank-dependent (torchrun): sharding, all-reduce, rank-0 I/O
sharding.py    FSDP2 (dist.strategy: fsdp): wrapping, equal collectives, gathered weights
checkpoint.py  atomic checkpoints; metrics.py, plots.py, diagnose.py, sft.py
rundir.py      a run directory for one run: exclusive creation, the run lock, --overwrite
shutdown.py    SIGINT / SIGTERM: finish the step, checkpoint, exit (a second signal: at once)
"""
