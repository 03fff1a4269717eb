"""Seeds as an axis: ``qfleet train --seeds`` writes one run per seed, and ``qfleet plot``
draws runs that differ only by seed as one mean with a ± std band (smoothing, any metric,
either x axis); the band's numbers are checked by hand."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qfleet.config import load_config
from qfleet.metrics import read_metrics
from qfleet.plots import expand, group_by_seed, mean_band, smooth

PNG = b"\x89PNG\r\n\x1a\n"


def test_smooth_is_a_trailing_mean_over_the_window() -> None:
    y = np.array([1.0, 5.0, 2.0, 8.0, 4.0])
    naive = [np.mean(y[max(0, i - 2): i + 1]) for i in range(len(y))]
    np.testing.assert_allclose(smooth(y, 3), naive)
    np.testing.assert_array_equal(smooth(y, 1), y)


def test_mean_band_from_the_latest_start_with_ended_runs_held() -> None:
    """Run a: y = x at 0, 10, 20; run b: 1, 2, 3 at 5, 15, 25 (given out of order, as a
    resumed run may log). From b's start at 5: a is 5, 10, 15, 20 and then holds 20 at 25
    (it ended, e.g. solved); b is 1, 1.5, 2, 2.5, 3 (interpolated)."""
    grid, mean, std = mean_band([np.array([0.0, 10.0, 20.0]), np.array([15.0, 5.0, 25.0])],
                                [np.array([0.0, 10.0, 20.0]), np.array([2.0, 1.0, 3.0])])
    np.testing.assert_array_equal(grid, [5.0, 10.0, 15.0, 20.0, 25.0])
    np.testing.assert_allclose(mean, [3.0, 5.75, 8.5, 11.25, 11.5])
    np.testing.assert_allclose(std, [2.0, 4.25, 6.5, 8.75, 8.5])


@pytest.fixture(scope="module")
def seeds_dir(tmp_path_factory: pytest.TempPathFactory,
              run_cli: Callable[..., Any], fast_sets: list[str]) -> tuple[Path, str]:
    base = tmp_path_factory.mktemp("seeds") / "dqn"
    proc = run_cli("train", "--seeds", "3,1", "--run-dir", str(base), sets=fast_sets)
    assert proc.returncode == 0, proc.stderr
    return base, proc.stdout


@pytest.mark.slow
def test_train_seeds_writes_one_run_per_seed_and_their_spread(
        seeds_dir: tuple[Path, str]) -> None:
    base, stdout = seeds_dir
    returns = []
    for seed in (3, 1):
        run = base / f"seed-{seed}"
        assert load_config(run / "config.toml").seed == seed
        returns.append(json.loads((run / "result.json").read_text())["eval_return_mean"])
    assert f"seeds 3, 1: final eval return {np.mean(returns):.1f} ± {np.std(returns):.1f}" \
        in " ".join(stdout.split())
    # Different seeds, different runs: the metrics are not one run written twice.
    assert read_metrics(base / "seed-3") != read_metrics(base / "seed-1")


@pytest.mark.slow
def test_runs_that_differ_only_by_seed_are_one_curve(seeds_dir: tuple[Path, str],
                                                     tiny_run: Path) -> None:
    base, _ = seeds_dir
    runs = expand([base, tiny_run])
    assert runs == [base / "seed-1", base / "seed-3", tiny_run]
    curves = group_by_seed([(r, read_metrics(r)) for r in runs])
    assert [(c.label, [p for p, _ in c.runs]) for c in curves] == [
        ("dqn (mean ± std, 2 seeds)", [base / "seed-1", base / "seed-3"]),
        (tiny_run.name, [tiny_run])]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--smooth", "2"], ["--metric", "loss", "--x", "steps"],
                                   ["--x", "wall"]], ids=["smooth", "loss-steps", "wall"])
def test_plot_of_a_seeds_folder_writes_a_png(seeds_dir: tuple[Path, str], extra: list[str],
                                             run_cli: Callable[..., Any],
                                             tmp_path: Path) -> None:
    base, _ = seeds_dir
    out = tmp_path / "seeds.png"
    proc = run_cli("plot", str(base), "-o", str(out), *extra)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 5000


@pytest.mark.slow
def test_an_unknown_metric_names_the_ones_there_are(seeds_dir: tuple[Path, str],
                                                    run_cli: Callable[..., Any],
                                                    clean_error: Callable[..., None],
                                                    tmp_path: Path) -> None:
    base, _ = seeds_dir
    clean_error(run_cli("plot", str(base), "--metric", "lossy", "-o", str(tmp_path / "x.png")),
                "--metric 'lossy'", "eval_return_mean", "loss")


@pytest.mark.parametrize("args, needles", [
    (["--seeds", "1,1"], ["--seeds", "distinct"]),
    (["--seeds", "0,b"], ["--seeds", "whole numbers"]),
    (["--seed", "1", "--seeds", "0,1"], ["--seeds", "not allowed with argument --seed"]),
    (["--seeds", f"0,{2**70}"], ["seed", str(2**70)]),
], ids=["repeated", "not-a-number", "with-seed", "out-of-range"])
def test_bad_seeds_exit_2_before_any_run(args: list[str], needles: list[str],
                                         run_cli: Callable[..., Any],
                                         clean_error: Callable[..., None],
                                         tmp_path: Path) -> None:
    clean_error(run_cli("train", *args, "--run-dir", str(tmp_path / "r")), *needles)
    assert not (tmp_path / "r").exists()
