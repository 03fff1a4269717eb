"""``qfleet compare``: configs trained over the same seeds and budget (runs that finished are
kept, cut-short ones resumed), trained run dirs reused as they are, and one self-contained
report whose table is checked against the runs' own result.json and metrics. The tests that
train are in the slow lane."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qfleet.metrics import read_metrics
from qfleet.timesplit import short

PNG = b"\x89PNG\r\n\x1a\n"
PRESETS = ("cartpole-dqn", "cartpole-per", "cartpole-a3c")  # replay, prioritized, gradients
TINY = ["learner.learning_starts=200", "train.eval_episodes=2", "train.eval_every=500",
        "log.tensorboard=false", "log.progress=false", "net.hidden=[32]"]


def _sets(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory,
             run_cli: Callable[..., Any]) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("compare") / "out"
    proc = run_cli("compare", *PRESETS, "--seeds", "2",
                   "--budget-steps", "1000", "-o", str(out), *_sets(TINY))
    assert proc.returncode == 0, proc.stderr
    return out, proc


@pytest.mark.slow
def test_every_config_runs_every_seed_on_the_budget(compared: tuple[Path, Any]) -> None:
    out, proc = compared
    for name in PRESETS:
        for seed in (0, 1):
            result = json.loads((out / "runs" / name / f"seed-{seed}" / "result.json")
                                .read_text())
            assert 1000 <= result["env_steps"] < 1100
    assert proc.stdout.count("compare: ") == 6


@pytest.mark.slow
def test_the_report_holds_both_figures_and_the_runs_numbers(compared: tuple[Path, Any]) -> None:
    out, _ = compared
    page = (out / "report.html").read_text()
    images = _images(page)
    assert len(images) == 2 and all(i[:8] == PNG for i in images)
    assert images[0] == (out / "return_vs_steps.png").read_bytes()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threshold"] == 475.0  # the presets' common train.target_return
    rows = {row[0]: dict(zip(summary["headers"], row, strict=True)) for row in summary["rows"]}
    for name, row in rows.items():
        runs = [out / "runs" / name / f"seed-{s}" for s in (0, 1)]
        results = [json.loads((r / "result.json").read_text()) for r in runs]
        finals = [r["eval_return_mean"] for r in results]
        assert row["final return"] == f"{np.mean(finals):.1f} ± {np.std(finals):.1f}"
        assert row["seeds"] == "2/2"
        assert row["env steps/s"] == f"{np.mean([r['env_steps_per_s'] for r in results]):,.0f}"
        reached = [any(e["eval_return_mean"] >= 475 for e in read_metrics(r)
                       if e["event"] == "eval") for r in runs]
        assert row["reached 475"] == f"{sum(reached)}/2"
        assert f"<td>{row['final return']}</td>" in page
        kinds = {short(r["verdict"]) for r in results}
        assert kinds and row["time verdict"] == " / ".join(sorted(kinds))
        for result in results:  # the whole verdict of every run, below the table
            assert html.escape(result["verdict"]) in page


@pytest.mark.slow
def test_the_report_opens_in_a_headless_browser(compared: tuple[Path, Any]) -> None:
    """Chromium renders the report from disk: both figures decode, the table has a row
    per config. ``make browser`` (run by CI) installs Chromium and its driver."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By

    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver_path is None:
        pytest.skip("no chromium / chromedriver here: `make browser` installs them")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(driver_path), options=options)
    try:
        driver.get((compared[0] / "report.html").as_uri())
        images = driver.find_elements(By.TAG_NAME, "img")
        widths = [driver.execute_script("return arguments[0].complete ? "
                                        "arguments[0].naturalWidth : 0", i) for i in images]
        assert len(images) == 2 and all(w > 300 for w in widths), widths
        head = [th.text for th in driver.find_elements(By.CSS_SELECTOR, "#summary thead th")]
        assert head[:3] == ["config", "seeds", "final return"] and \
            head[-1] == "time verdict", head
        assert len(driver.find_elements(By.CSS_SELECTOR, "#verdicts li")) == 6
        rows = driver.find_elements(By.CSS_SELECTOR, "#summary tbody tr")
        assert [r.find_element(By.TAG_NAME, "td").text for r in rows] == list(PRESETS)
    finally:
        driver.quit()


@pytest.mark.slow
def test_a_second_compare_trains_only_what_did_not_finish(
        compared: tuple[Path, Any], run_cli: Callable[..., Any], tmp_path: Path) -> None:
    out, _ = compared
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    cut = copy / "runs" / "cartpole-per" / "seed-1"
    before = json.loads((cut / "result.json").read_text())
    (cut / "result.json").unlink()  # as if Ctrl-C came after its last checkpoint
    proc = run_cli("compare", *PRESETS, "--seeds", "2",
                   "--budget-steps", "1000", "-o", str(copy), *_sets(TINY))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("compare: ") == 1 and "cartpole-per seed 1 (1/1)" in proc.stdout
    assert json.loads((cut / "result.json").read_text())["env_steps"] == before["env_steps"]


@pytest.mark.slow
def test_jobs_train_runs_at_once_each_on_a_wall_time_budget(
        run_cli: Callable[..., Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli("compare", "cartpole-dqn", "cartpole-a3c", "--seeds", "1", "--jobs", "2",
                   "--budget-s", "4", "--budget-steps", "100000000", "-o", str(out),
                   *_sets([*TINY, "train.eval_every=0"]))
    assert proc.returncode == 0, proc.stderr
    said = [line for line in proc.stdout.splitlines() if line.startswith("compare: ")]
    assert [line.split(" seed ")[0] for line in said[:2]] == \
        ["compare: cartpole-dqn", "compare: cartpole-a3c"]  # both started before
    assert all("started" in line for line in said[:2]) and len(said) == 4  # either ended
    for name in ("cartpole-dqn", "cartpole-a3c"):
        run = out / "runs" / name / "seed-0"
        result = json.loads((run / "result.json").read_text())
        assert result["stopped"] == "wall time" and 4.0 <= result["wall_s"] < 60
        assert "done:" in (run.parent / "seed-0.log").read_text()


@pytest.mark.slow
def test_trained_run_dirs_are_compared_without_training(
        compared: tuple[Path, Any], tiny_run: Path, run_cli: Callable[..., Any],
        tmp_path: Path) -> None:
    out, _ = compared
    proc = run_cli("compare", str(out / "runs" / "cartpole-dqn"), str(tiny_run),
                   "--threshold", "9", "-o", str(tmp_path / "again"))
    assert proc.returncode == 0, proc.stderr
    assert "compare: " not in proc.stdout
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert summary["threshold"] == 9.0
    assert [row[:2] for row in summary["rows"]] == [["cartpole-dqn", "2/2"],
                                                    [tiny_run.name, "1/1"]]


def test_a_bad_budget_or_jobs_exits_2(run_cli: Callable[..., Any], tmp_path: Path,
                                      clean_error: Callable[..., None]) -> None:
    clean_error(run_cli("compare", "cartpole-dqn", "--budget-s", "0", "-o", str(tmp_path)),
                "--budget-s", "must be a finite number > 0")
    clean_error(run_cli("compare", "cartpole-dqn", "--jobs", "0", "-o", str(tmp_path)),
                "--jobs", "must be >= 1")


def test_a_bad_source_exits_2_before_training(run_cli: Callable[..., Any], tmp_path: Path,
                                              clean_error: Callable[..., None]) -> None:
    clean_error(run_cli("compare", "cartpole-dqn", "cartpole-dq", "-o", str(tmp_path / "o")),
                "unknown preset 'cartpole-dq'")
    assert not (tmp_path / "o").exists()


def test_a_plan_toml_lists_runs_with_their_own_overrides(tmp_path: Path) -> None:
    from qfleet.compare import plan

    (tmp_path / "mine.toml").write_text(
        (Path(__file__).parents[1] / "qfleet/presets/cartpole-per.toml").read_text())
    (tmp_path / "plan.toml").write_text(
        '[[run]]\nname = "small"\nconfig = "cartpole-dqn"\nset = ["net.hidden=[64]"]\n\n'
        '[[run]]\nconfig = "cartpole-dqn"\n\n[[run]]\nconfig = "mine.toml"\n'
        'set = ["learner.lr=0.002"]\n')
    entries = plan([str(tmp_path / "plan.toml")], [0, 1], ["learner.lr=0.001"], tmp_path / "o")
    assert [e.name for e in entries] == ["small", "cartpole-dqn", "mine"]
    assert [c.net.hidden for c in entries[0].configs] == [[64], [64]]
    assert entries[1].configs[0].net.hidden != [64]
    assert [c.learner.lr for e in entries for c in e.configs] == [0.001] * 4 + [0.002] * 2
    assert [c.seed for c in entries[2].configs] == [0, 1]
    assert entries[2].runs == [tmp_path / "o" / "runs" / "mine" / f"seed-{s}" for s in (0, 1)]


@pytest.mark.parametrize(("text", "needle"), [
    ('[[run]]\nname = "x"\n', "needs config"),
    ('[[run]]\nconfig = "cartpole-dqn"\nseeds = 3\n', "unknown key 'seeds'"),
    ('[[run]]\nconfig = "cartpole-dqn"\nset = "net.hidden=[64]"\n', "list of 'section.key"),
    ('[[run]]\nconfig = "cartpole-dqn"\n[env]\nid = "x"\n', "only [[run]] tables"),
    ('[[run]]\nconfig = "cartpole-dqn"\nset = ["net.hiden=[64]"]\n', "hiden"),
])
def test_a_bad_plan_names_the_run_and_the_key(tmp_path: Path, text: str, needle: str) -> None:
    from qfleet.compare import plan
    from qfleet.config import ConfigError

    (tmp_path / "plan.toml").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        plan([str(tmp_path / "plan.toml")], [0], [], tmp_path / "o")


def test_the_readme_plan_is_a_valid_plan(tmp_path: Path) -> None:
    from qfleet.compare import plan

    section = (Path(__file__).parents[1] / "README.md").read_text() \
        .split("### Which scheme?")[1].split("\n### ")[0]
    (block,) = re.findall(r"^```toml\n(.*?)^```", section, re.S | re.M)
    (tmp_path / "plan.toml").write_text(block)
    entries = plan([str(tmp_path / "plan.toml")], [0], [], tmp_path / "o")
    assert [e.name for e in entries] == ["dqn-64", "cartpole-apex"]
