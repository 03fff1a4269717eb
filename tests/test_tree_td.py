"""``update_td``: PER's priority of a TD error, (|td| + eps) ** alpha, written by both trees
(the compiled one in one pass) against the formula by hand, with the largest returned and
a NaN refused as ``update`` refuses it."""

from __future__ import annotations

import numpy as np
import pytest

from qfleet.replay.sumtree import SumMinTree
from qfleet.replay.widetree import WideSumMinTree

TREES = [SumMinTree, WideSumMinTree]


@pytest.mark.parametrize("tree_cls", TREES)
def test_update_td_writes_the_per_priority_and_returns_the_largest(tree_cls: type) -> None:
    tree = tree_cls(10)
    top = tree.update_td(np.array([1, 4, 7]), np.array([-2.0, 0.0, 0.5]), 0.25, 0.5)
    want = [(2.0 + 0.25) ** 0.5, 0.25 ** 0.5, 0.75 ** 0.5]
    assert tree.get(np.array([1, 4, 7])).tolist() == pytest.approx(want, rel=1e-15)
    assert top == pytest.approx(1.5, rel=1e-15)
    assert tree.total == pytest.approx(sum(want), rel=1e-15)
    assert tree.update_td(np.array([], np.int64), np.array([]), 0.25, 0.5) == 0.0


@pytest.mark.parametrize("tree_cls", TREES)
def test_update_td_refuses_a_nan_error(tree_cls: type) -> None:
    tree = tree_cls(4)
    with pytest.raises(ValueError, match="finite"):
        tree.update_td(np.array([0, 1]), np.array([1.0, np.nan]), 1e-6, 0.6)


def test_both_trees_agree_on_many_errors() -> None:
    rng = np.random.default_rng(0)
    ref, wide = SumMinTree(1000), WideSumMinTree(1000)
    for _ in range(20):
        slots, td = rng.integers(0, 1000, 64), rng.normal(size=64) * 3
        assert ref.update_td(slots, td, 1e-6, 0.6) == pytest.approx(
            wide.update_td(slots, td, 1e-6, 0.6), rel=1e-14)
    np.testing.assert_allclose(wide.priorities_N, ref.priorities_N, rtol=1e-14)
