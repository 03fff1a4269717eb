"""Train presets to their published thresholds and report greedy evaluation over 20 episodes.

The CartPole presets are checked in the test suite's slow lane; the longer ones live here.
For each preset and seed it prints the final greedy eval, the env steps and wall time at
which an eval first reached the threshold, and whether it passed. Reference: the
threshold itself (Acrobot-v1 >= -100, LunarLander-v3 >= 200), as the issue states them.

    python benchmarks/presets_learning.py [--presets acrobot-dqn lunarlander-dqn] [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import qfleet

THRESHOLDS = {"Acrobot-v1": -100.0, "LunarLander-v3": 200.0, "CartPole-v1": 475.0}


def first_reaching(run_dir: Path, threshold: float) -> tuple[int, float] | None:
    with (run_dir / "metrics.jsonl").open() as fh:
        for rec in map(json.loads, fh):
            if rec["event"] == "eval" and rec["eval_return_mean"] >= threshold:
                return rec["env_steps"], rec["wall_s"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["acrobot-dqn", "lunarlander-dqn"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="/tmp/qfleet-bench/presets")
    args = parser.parse_args()
    rows = []
    for preset in args.presets:
        for seed in args.seeds:
            cfg = qfleet.load_config(preset, [f"seed={seed}", "log.progress=false"])
            threshold = THRESHOLDS[cfg.env.id]
            run_dir = Path(args.out) / f"{preset}-{seed}-{time.strftime('%H%M%S')}"
            result = qfleet.train(cfg, run_dir)
            hit = first_reaching(run_dir, threshold)
            when = f"first >= {threshold:g} at {hit[0]:,} steps / {hit[1]:.0f} s" if hit \
                else f"never >= {threshold:g}"
            ok = result.eval_return_mean >= threshold
            rows.append(ok)
            print(f"{preset:<18} seed {seed}: final eval {result.eval_return_mean:8.1f} ± "
                  f"{result.eval_return_std:5.1f} after {result.env_steps:,} steps, "
                  f"{result.wall_s:.0f} s; {when}; {'PASS' if ok else 'FAIL'}", flush=True)
    print(f"\n{sum(rows)}/{len(rows)} runs at or above their threshold")


if __name__ == "__main__":
    main()
