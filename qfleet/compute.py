"""How a process that trains uses its CPU: the torch thread count, and denormal floats
flushed to zero.

Adam's second-moment estimates of rarely-moving weights decay into denormal floats, which
the CPU computes on 10-100x slower: on CartPole DQN the fused Adam step went from ~0.1 ms
to ~0.7 ms per update once they appeared. Flushing them changes values below ~1e-38 only.
Every process that computes (the main one, every worker) sets the same, so backends agree.
The flag is the CPU's, per thread: ``qfleet.train`` called inside a user's process puts it
back as it was when the run ends (other code there may need denormals: Hypothesis refuses
to draw floats without them).
"""

from __future__ import annotations

import sys

import torch


def denormals_flushed() -> bool:
    """Whether this thread flushes denormal floats to zero now."""
    return sys.float_info.min / 4 == 0.0  # a denormal, unless flushed


def pin_torch(threads: int) -> bool:
    """``threads`` torch threads (0 keeps torch's default) and denormals flushed to zero;
    returns whether they were flushed before (for ``torch.set_flush_denormal`` to restore)."""
    before = denormals_flushed()
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    return before
