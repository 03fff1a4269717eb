"""How a process that trains uses its CPU: the torch thread count, and denormal floats
flushed to zero.

Adam's second-moment estimates of rarely-moving weights decay into denormal floats, which
the CPU computes on 10-100x slower: on CartPole DQN the fused Adam step went from ~0.1 ms
to ~0.7 ms per update once they appeared. Flushing them changes values below ~1e-38 only.
Every process that computes (the main one, every worker) sets the same, so backends agree.
"""

from __future__ import annotations

import torch


def pin_torch(threads: int) -> None:
    """``threads`` torch threads (0 keeps torch's default) and denormals flushed to zero."""
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
