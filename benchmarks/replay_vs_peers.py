"""qfleet prioritized replay vs Tianshou's and TorchRL's PrioritizedReplayBuffer.

One run, capacity 1M, batch 256, CartPole-shaped transitions (obs: 4 float32):
  - adds/s, in chunks of 256, once the buffer is full (the ring keeps overwriting);
  - sample + priority-update cycles/s once full (new random |td| every cycle);
  - qfleet prioritized sample+update vs qfleet uniform sample (the PER overhead);
  - the Atari-shaped memory figure (1M transitions of 4x84x84 uint8 stacks).
Every rate is the best of several short blocks, with the contenders interleaved block
by block, so a busy machine slows all of them alike. A peer that cannot be imported or
loaded is reported as "unavailable: reason" and the run goes on.
Goals (#15, first two; the rest from issue 4): sample+update >= 1.5x Tianshou; prioritized
sample+update <= 2x the cost of a uniform sample; sample+update >= 2x TorchRL; adds >= 5x
Tianshou.

    python benchmarks/replay_vs_peers.py [--capacity 1000000] [--batch 256] [--block-s 0.4]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from qfleet.replay import FrameStorage, PrioritizedReplay, RingStorage, Transitions, UniformReplay

OBS = (4,)
ALPHA, BETA = 0.6, 0.4


class Contender:
    """One library's buffer behind three calls: fill, add one chunk, one sample+update."""

    name = "?"

    def add_chunk(self) -> None:
        raise NotImplementedError

    def cycle(self) -> None:
        raise NotImplementedError

    def fill(self, capacity: int, batch: int) -> None:
        for _ in range(-(-capacity // batch)):
            self.add_chunk()


def cartpole_chunk(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    obs = rng.standard_normal((n, *OBS)).astype(np.float32)
    return {"obs": obs, "act": rng.integers(0, 2, n), "rew": np.ones(n, np.float32),
            "done": np.zeros(n, bool), "next": obs + np.float32(0.01)}


class QfleetPER(Contender):
    name = "qfleet PER"

    def __init__(self, capacity: int, batch: int, rng: np.random.Generator) -> None:
        self.batch, self.rng = batch, rng
        self.replay = PrioritizedReplay(RingStorage(capacity, OBS, np.dtype(np.float32)),
                                        np.random.default_rng(0), alpha=ALPHA, beta0=BETA)
        c = cartpole_chunk(rng, batch)
        self.chunk = Transitions(c["obs"], c["act"], c["rew"], np.full(batch, 0.99, np.float32),
                                 c["next"])

    def add_chunk(self) -> None:
        self.replay.add(self.chunk)

    def cycle(self) -> None:
        batch = self.replay.sample(self.batch)
        self.replay.update_priorities(batch.indices_B, self.rng.random(self.batch))


class QfleetUniform(QfleetPER):
    name = "qfleet uniform (sample only)"

    def __init__(self, capacity: int, batch: int, rng: np.random.Generator) -> None:
        super().__init__(capacity, batch, rng)
        self.replay = UniformReplay(RingStorage(capacity, OBS, np.dtype(np.float32)),  # type: ignore[assignment]
                                    np.random.default_rng(0))

    def cycle(self) -> None:
        self.replay.sample(self.batch)


class TianshouPER(Contender):
    """Tianshou's PrioritizedReplayBuffer adds one transition per call, so its chunk of 256
    is 256 calls; its vector buffer (one sub-buffer per row) is timed for adds as well and
    the faster of the two is the one compared."""

    def __init__(self, capacity: int, batch: int, rng: np.random.Generator,
                 vector: bool) -> None:
        from tianshou.data import Batch, PrioritizedReplayBuffer, PrioritizedVectorReplayBuffer

        self.name = "Tianshou PER" + (" (vector, 256 sub-buffers)" if vector else "")
        self.batch, self.rng, self.vector = batch, rng, vector
        c = cartpole_chunk(rng, batch)
        rows = Batch(obs=c["obs"], act=c["act"], rew=c["rew"], terminated=c["done"],
                     truncated=c["done"], obs_next=c["next"])
        if vector:
            self.buf: Any = PrioritizedVectorReplayBuffer(capacity, batch, alpha=ALPHA,
                                                          beta=BETA)
            self.rows, self.ids = rows, np.arange(batch)
        else:
            self.buf = PrioritizedReplayBuffer(capacity, alpha=ALPHA, beta=BETA)
            self.items = [rows[i] for i in range(batch)]

    def add_chunk(self) -> None:
        if self.vector:
            self.buf.add(self.rows, buffer_ids=self.ids)
        else:
            for item in self.items:
                self.buf.add(item)

    def cycle(self) -> None:
        _, index = self.buf.sample(self.batch)
        self.buf.update_weight(index, self.rng.random(self.batch))


class TorchRLPER(Contender):
    name = "TorchRL PER"

    def __init__(self, capacity: int, batch: int, rng: np.random.Generator) -> None:
        import torch
        from tensordict import TensorDict
        from torchrl.data import LazyTensorStorage, PrioritizedReplayBuffer

        self.batch, self.torch = batch, torch
        self.buf = PrioritizedReplayBuffer(alpha=ALPHA, beta=BETA,
                                           storage=LazyTensorStorage(capacity), batch_size=batch)
        c = cartpole_chunk(rng, batch)
        self.rows = TensorDict({k: torch.as_tensor(v) for k, v in c.items()}, batch_size=[batch])
        self.buf.extend(self.rows)  # loading the compiled sum-tree happens here
        self.buf.sample()

    def add_chunk(self) -> None:
        self.buf.extend(self.rows)

    def cycle(self) -> None:
        _, info = self.buf.sample(return_info=True)
        self.buf.update_priority(info["index"], self.torch.rand(self.batch))


def best_rates(contenders: list[Contender], op: Callable[[Contender], Callable[[], None]],
               block_s: float, blocks: int) -> dict[str, float]:
    """Calls per second of each contender's op: the best block, blocks interleaved."""
    best = {c.name: 0.0 for c in contenders}
    for _ in range(blocks):
        for c in contenders:
            fn, calls = op(c), 0
            t0 = time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < block_s:
                fn()
                calls += 1
            best[c.name] = max(best[c.name], calls / elapsed)
    return best


def build(args: argparse.Namespace) -> tuple[list[Contender], list[str]]:
    rng = np.random.default_rng(0)
    makers: list[tuple[str, Callable[[], Contender]]] = [
        ("qfleet PER", lambda: QfleetPER(args.capacity, args.batch, rng)),
        ("qfleet uniform", lambda: QfleetUniform(args.capacity, args.batch, rng)),
        ("Tianshou PER", lambda: TianshouPER(args.capacity, args.batch, rng, vector=False)),
        ("Tianshou PER (vector)", lambda: TianshouPER(args.capacity, args.batch, rng,
                                                      vector=True)),
        ("TorchRL PER", lambda: TorchRLPER(args.capacity, args.batch, rng)),
    ]
    built, missing = [], []
    for label, make in makers:
        try:
            contender = make()
            t0 = time.perf_counter()
            contender.fill(args.capacity, args.batch)
            print(f"{contender.name:<40} filled to {args.capacity:,} in "
                  f"{time.perf_counter() - t0:5.1f} s", flush=True)
            built.append(contender)
        except Exception as err:  # a peer that cannot load must not stop the benchmark
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            print(f"{label:<40} unavailable: {reason}", flush=True)
            missing.append(label)
    return built, missing


def ratio_line(what: str, ours: float, theirs: float | None, goal: float,
               higher_is_better: bool = True) -> str:
    if theirs is None:
        return f"{what:<58} n/a (peer unavailable)"
    r = ours / theirs
    ok = r >= goal if higher_is_better else r <= goal
    sign = ">=" if higher_is_better else "<="
    return f"{what:<58} {r:6.2f}x  (goal {sign} {goal:g}x: {'met' if ok else 'NOT met'})"


def atari_memory() -> None:
    shape, u8 = (4, 84, 84), np.dtype(np.uint8)
    replay = PrioritizedReplay(FrameStorage(1_000_000, shape, u8), np.random.default_rng(0))
    naive = RingStorage(1, shape, u8).nbytes * 1_000_000
    print(f"\nAtari-shaped memory, 1M transitions of 4x84x84 uint8 (preallocated):\n"
          f"  qfleet FrameStorage + PER tree: {replay.nbytes / 1e9:6.2f} GB "
          f"({replay.nbytes / 2**30:.2f} GiB); goal <= 7.5 GB: "
          f"{'met' if replay.nbytes <= 7.5e9 else 'NOT met'}\n"
          f"  naive obs + next_obs ring:      {naive / 1e9:6.2f} GB "
          f"({naive / replay.nbytes:.1f}x more)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capacity", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--block-s", type=float, default=0.4)
    parser.add_argument("--blocks", type=int, default=5)
    args = parser.parse_args()
    contenders, _ = build(args)
    by_name = {c.name: c for c in contenders}
    ours = by_name.get("qfleet PER")
    if isinstance(ours, QfleetPER):  # the compiled tree needs numba (the `fast` extra)
        print(f"qfleet PER's tree: {type(ours.replay.tree).__name__}")
    adds = best_rates([c for c in contenders if "uniform" not in c.name],
                      lambda c: c.add_chunk, args.block_s, args.blocks)
    cycles = best_rates(contenders, lambda c: c.cycle, args.block_s, args.blocks)
    print(f"\n{'buffer':<40} {'adds/s (chunks)':>16} {'sample+update/s':>16}")
    for name in by_name:
        add = f"{adds[name] * args.batch:16,.0f}" if name in adds else f"{'-':>16}"
        print(f"{name:<40} {add} {cycles[name]:16,.0f}")
    ours_cycle, ours_add = cycles["qfleet PER"], adds["qfleet PER"]
    tianshou = [n for n in by_name if n.startswith("Tianshou")]
    ts_cycle = max((cycles[n] for n in tianshou), default=None)
    ts_add = max((adds[n] for n in tianshou), default=None)
    trl = by_name.get("TorchRL PER")
    print("\nratios (qfleet / peer; the best Tianshou variant):")
    print(ratio_line("sample+update vs Tianshou", ours_cycle, ts_cycle, 1.5))
    print(ratio_line("sample+update vs TorchRL", ours_cycle,
                     cycles[trl.name] if trl else None, 2.0))
    print(ratio_line("adds in chunks of 256 vs Tianshou", ours_add, ts_add, 5.0))
    print(ratio_line("adds in chunks of 256 vs TorchRL", ours_add,
                     adds[trl.name] if trl else None, 1.0))
    uniform = cycles.get("qfleet uniform (sample only)")
    if uniform:
        print(ratio_line("cost of PER sample+update / uniform sample", uniform, ours_cycle, 2.0,
                         higher_is_better=False))
    atari_memory()


if __name__ == "__main__":
    main()
