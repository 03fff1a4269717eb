"""Learner updates/s for the Nature CNN (an Atari preset) with and without
learner.background_sample: the next prioritized group drawn (frames gathered and stacked,
copied to the learner's device) in a thread while the current group trains. The reference
is the same learner drawing in line, in the same run, on the same replay of real Atari
transitions. Goal (issue #14): background >= 1.3 x in line at batch 512. The time split
says where a round goes: a thread can hide at most the draw.

    python benchmarks/learner_prefetch.py [--preset pong-apex] [--seconds 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import NO_TRAINING

import qfleet
from qfleet.algos import build_program
from qfleet.algos.program import ActorLearnerProgram
from qfleet.replay import Replay
from qfleet.runtime import InlineRunner, LearnerSide

UPDATES_PER_CALL = 4  # one train() call: 4 groups of 1 batch, 3 of them drawn ahead


def program(preset: str, device: str, *sets: str) -> ActorLearnerProgram:
    cfg = qfleet.load_config(preset, [f"learner.device='{device}'", "learner.prefetch=1",
                                      "log.progress=false", "log.tensorboard=false", *sets])
    built = build_program(cfg)
    assert isinstance(built, ActorLearnerProgram)
    return built


def filled_replay(preset: str, transitions: int) -> Replay:
    """A replay of real transitions from the preset's own actors (no training)."""
    runner = InlineRunner(program(preset, "cpu", f"learner.learning_starts={NO_TRAINING}"))
    try:
        while len(runner.replay) < transitions:
            runner.step()
        return runner.replay
    finally:
        runner.close()


def updates_per_s(side: LearnerSide, seconds: float) -> tuple[float, dict[str, float]]:
    side.train(UPDATES_PER_CALL)  # warm-up: first allocations, CUDA kernels
    side.clock.take()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += len(side.train(UPDATES_PER_CALL))
    if side.learner.device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start), side.clock.take()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="pong-apex")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured wall time each")
    parser.add_argument("--transitions", type=int, default=8192, help="replay rows to draw from")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    replay = filled_replay(args.preset, args.transitions)
    print(f"{args.preset}: {len(replay)} transitions in replay, learner on {args.device} "
          f"({torch.get_num_threads()} torch threads), {args.seconds:g} s each", flush=True)
    for batch in (32, 512):
        rates = {}
        for background in ("off", "on"):
            side = LearnerSide(program(args.preset, args.device, f"learner.batch_size={batch}",
                                       f"learner.background_sample='{background}'"))
            side.replay = replay
            rates[background], times = updates_per_s(side, args.seconds)
            split = ", ".join(f"{k} {v / sum(times.values()):.1%}" for k, v in times.items())
            print(f"batch {batch:>3}, background {background:>3}: {rates[background]:7.2f} "
                  f"updates/s ({split})", flush=True)
        print(f"batch {batch:>3}: background / in line = {rates['on'] / rates['off']:.2f}"
              + (" (goal >= 1.3)" if batch == 512 else ""), flush=True)


if __name__ == "__main__":
    main()
