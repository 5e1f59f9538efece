"""Where one seqrl RL step spends its time: torch.profiler over a few steps, by phase and by op.

The settings of benchmarks/vs_trl.py (``--shape``: short, long, g1, long-30m; one on-policy
AdamW step). Phases are labelled by wrapping the sampler, the model's
forward calls, the backward pass and the optimizer step; the op table shows what the time is
made of (matrix multiplies = compute; the rest = element-wise work and per-call overhead).
The profiler adds overhead of its own, so compare shares rather than absolute times.

    python benchmarks/profile_step.py --arm seqrl
    python benchmarks/profile_step.py --arm seqrl-ref --shape long
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).parent))
import vs_trl


def labelled(name: str, fn):
    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", default="seqrl", choices=sorted(vs_trl.ARMS))
    parser.add_argument("--shape", default="short", choices=list(vs_trl.SHAPES))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ops", type=int, default=12, help="rows of the op table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        shape = vs_trl.SHAPES[args.shape]
        vs_trl.save_model(tmp / "model", shape)
        arm = vs_trl.SeqrlArm(args.arm, tmp / "model", tmp / "run", shape)
        for _ in range(3):  # warm-up
            arm()
        trainer = arm.trainer
        model = trainer.model
        phase = {"now": "update"}
        generate = trainer.sampler.generate

        def generate_labelled(*a, **k):
            phase["now"] = "rollout"
            try:
                with record_function("rollout: generate"):
                    return generate(*a, **k)
            finally:
                phase["now"] = "update"

        forward = model.forward

        def forward_labelled(*a, **k):
            with record_function(f"{phase['now']}: model forward"):
                return forward(*a, **k)

        trainer.sampler.generate, model.forward = generate_labelled, forward_labelled
        trainer.optimizer.step = labelled("update: optimizer step", trainer.optimizer.step)
        backward = torch.Tensor.backward
        torch.Tensor.backward = labelled("update: backward", backward)
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    with record_function("step"):
                        arm()
        finally:
            torch.Tensor.backward = backward
    events = {e.key: e for e in prof.key_averages()}
    per_step = {k: e.cpu_time_total / 1e3 / args.steps for k, e in events.items()}
    step = per_step["step"]
    print(
        f"# {args.arm}, shape {args.shape!r}: {args.steps} profiled steps, {torch.get_num_threads()} threads; "
        f"ms per step (profiler overhead included)\n"
    )
    print("| phase | ms/step | share |")
    print("|---|---:|---:|")
    calls = {k: e.count // args.steps for k, e in events.items()}
    rows = [
        ("rollout: generate (all of it)", per_step["rollout: generate"]),
        (
            f"rollout: model forwards ({calls['rollout: model forward']} calls)",
            per_step["rollout: model forward"],
        ),
        (
            f"update: model forwards ({calls.get('update: model forward', 0)} calls)",
            per_step.get("update: model forward", 0.0),
        ),
        ("update: backward", per_step.get("update: backward", 0.0)),
        ("update: optimizer step", per_step.get("update: optimizer step", 0.0)),
    ]
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {100 * ms / step:.0f}% |")
    print(f"| whole step | {step:.1f} | 100% |\n")
    print("| op (self time) | ms/step | calls/step |")
    print("|---|---:|---:|")
    aten = sorted(
        (e for e in events.values() if e.key.startswith("aten::")),
        key=lambda e: -e.self_cpu_time_total,
    )
    for e in aten[: args.ops]:
        print(
            f"| {e.key} | {e.self_cpu_time_total / 1e3 / args.steps:.1f} | "
            f"{e.count // args.steps} |"
        )


if __name__ == "__main__":
    main()
