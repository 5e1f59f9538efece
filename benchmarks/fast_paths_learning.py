"""Learning is the same with the fast paths: held-out accuracy, fast vs reference, same seeds.

Runs the GSPO preset (the built-in warm start, 3-digit addition, 8 prompts × 8 samples, four
minibatches per rollout, so the fast forwards serve both the θ_old pass and the updates) twice
per seed: with seqrl's defaults (``rollout.engine=fast``, ``algo.shared_prefix`` and
``algo.packing`` on) and with the reference paths (``model.generate``, one padded joint forward
per micro-batch). Prints greedy held-out accuracy and the step's mean reward along the way. The
log-prob, loss and gradient equality itself is tested exactly in tests/rollout/test_fast_sampler.py,
tests/train/test_shared_prefix.py and tests/train/test_packing.py; this shows what the
float-rounding differences left do to a whole run.

    python benchmarks/fast_paths_learning.py --steps 40 --seeds 0 1
"""

from __future__ import annotations

import argparse
import tempfile
import time

from seqrl.config import load_config
from seqrl.train.trainer import Trainer

PATHS = {
    "fast": [],  # the defaults
    "reference": ["rollout.engine=hf", "algo.shared_prefix=false", "algo.packing=false"],
}


def run(path: str, seed: int, steps: int, every: int, lr: float, out: str) -> dict:
    overrides = [
        "preset=gspo",
        f"seed={seed}",
        f"optim.lr={lr}",
        "task.eval_size=200",
        "train.eval_samples=0",
        "train.log_samples=0",
        *PATHS[path],
    ]
    trainer = Trainer(load_config(None, overrides), run_dir=f"{out}/{path}-{seed}", progress=False)
    curve, rewards = {0: trainer.evaluate()["eval/greedy_acc"]}, []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        rewards.append(trainer.train_step(step)["reward/mean"])
        if step % every == 0:
            curve[step] = trainer.evaluate()["eval/greedy_acc"]
    return {"acc": curve, "reward": rewards, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lr", type=float, default=5e-5)
    args = parser.parse_args()
    print(
        f"# GSPO preset, lr {args.lr}, {args.steps} steps; greedy accuracy on 200 held-out prompts\n"
    )
    print(
        "| seed | path | "
        + " | ".join(f"acc@{s}" for s in range(0, args.steps + 1, args.every))
        + " |"
    )
    print("|---|---|" + "---:|" * (args.steps // args.every + 1))
    with tempfile.TemporaryDirectory() as out:
        for seed in args.seeds:
            results = {p: run(p, seed, args.steps, args.every, args.lr, out) for p in PATHS}
            for path, r in results.items():
                accs = " | ".join(f"{a:.3f}" for a in r["acc"].values())
                print(f"| {seed} | {path} ({r['seconds']:.0f} s) | {accs} |")
            same = sum(
                a == b
                for a, b in zip(
                    results["fast"]["reward"], results["reference"]["reward"], strict=True
                )
            )
            print(f"|   | steps with identical mean reward | {same}/{args.steps} |")


if __name__ == "__main__":
    main()
