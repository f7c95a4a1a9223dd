"""The MLflow UI as a user meets it, in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven
by Selenium): a tracking server on 127.0.0.1, a tiny sweep logged to it, then the link the sweep prints.

Checks that the link opens the experiment on its runs table (not MLflow 3's GenAI overview), that the accuracy and
searched-parameter columns are shown, that the trials unfold nested under the sweep's row, that the sweep's
dashboards are among its artifacts and that the registered model shows alias ``champion``. Screenshots of each page
are kept in ``$COOP_TEST_ARTIFACTS/mlflow-ui`` (default ``test-artifacts/mlflow-ui`` in the repository).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
from servers import running_server

pytestmark = [pytest.mark.ray, pytest.mark.browser, pytest.mark.long]

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SHOTS = Path(os.environ.get("COOP_TEST_ARTIFACTS", REPO / "test-artifacts")) / "mlflow-ui"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 with a SQLite store and proxied artifacts; stopped after the tests."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    argv = [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
            "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{mlflow_bin.parent}{os.pathsep}{env.get('PATH', '')}"
    url = f"http://127.0.0.1:{port}"
    with running_server(argv, cwd=tmp, env=env, log=tmp / "server.log", health_url=f"{url}/health",
                        what="mlflow server", timeout_s=120):
        yield url


@pytest.fixture(scope="module")
def ui_sweep(tracking_server, ray_session, small_eurosat_root, tiny_vit_config, feature_cache, tmp_path_factory):
    """A tiny sweep (3 trials, 2 epochs) tracked on the server, through the CLI's main as a user runs it."""
    from platform.tune import main

    tmp = tmp_path_factory.mktemp("ui-sweep")
    argv = ["--dataset", "eurosat", "--data-root", str(small_eurosat_root), "--backbone", tiny_vit_config,
            "--pretrained", "none", "--shots", "1", "--epochs", "2", "--n-views", "1", "--batch-size", "8",
            "--max-test-items", "20", "--num-samples", "3", "--max-concurrent", "2", "--cache-dir",
            str(feature_cache), "--storage-path", str(tmp / "ray"), "--tracking-uri", tracking_server,
            "--sweep-name", "ui", "--json"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv)
    lines = out.getvalue().strip().splitlines()
    assert rc == 0, "\n".join(lines[-30:])
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        why = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}; .ci/run installs them")  # CI must run this test, not skip it
        pytest.skip(why)
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=2800,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def _wait_text(driver, *texts: str, timeout: float = 60) -> str:
    """Wait until the page's visible text holds every one of ``texts``; return that text."""
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        body = driver.find_element("tag name", "body").text
        if all(t in body for t in texts):
            return body
        time.sleep(0.5)
    driver.save_screenshot(str(SHOTS / "failed.png"))
    raise AssertionError(f"never saw {[t for t in texts if t not in body]} on {driver.current_url}:\n{body[:3000]}")


def _shot(driver, name: str) -> Path:
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000, path
    return path


def _trial_names(summary: dict, tracking_server: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_server)
    parent = client.get_run(summary["parent_run_id"])
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    return sorted(r.info.run_name for r in runs)


def test_the_printed_link_opens_the_runs_with_accuracy_columns_and_nested_trials(browser, ui_sweep,
                                                                                  tracking_server):
    from selenium.webdriver.common.by import By

    url = ui_sweep["runs_url"]
    assert url.startswith(f"{tracking_server}/#/experiments/") and "workflowType=machine_learning" in url
    browser.get(url)
    # The grid draws only the columns in view: the window is wide enough for all of them.
    body = _wait_text(browser, "Runs", "ui", "val_acc", "test_acc", "zeroshot_test_acc", "prompt.n_ctx",
                      "prompt.class_token_position", "prompt.csc", "prompt.ctx_init", "train.lr")
    assert "Traces" not in body.split("Runs")[0] or "Overview" not in body  # not the GenAI overview
    assert "Model training" in body
    _shot(browser, "1-runs-table-folded")
    trials = _trial_names(ui_sweep, tracking_server)
    assert len(trials) == 3
    assert not any(t in body for t in trials)  # folded under the sweep's row
    # The "+" button in the sweep row's name cell unfolds its child runs.
    name = browser.find_element(By.XPATH, "//a[@href and normalize-space(.)='ui']")
    cell = name.find_element(By.XPATH, "./ancestor::*[@role='gridcell'][1]")
    expanders = cell.find_elements(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']")
    assert expanders, "no expander on the sweep's row"
    expanders[0].click()
    body = _wait_text(browser, *trials)
    _shot(browser, "2-runs-table-trials-nested")
    rows = [line for line in body.splitlines() if line.startswith(("trial-", "ui"))]
    assert rows[0] == "ui" or rows[0].startswith("ui"), rows  # the sweep first, its trials under it


def test_the_sweep_run_shows_its_description_and_dashboards(browser, ui_sweep, tracking_server):
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_server).get_run(ui_sweep["parent_run_id"])
    from platform import tracking

    browser.get(tracking.run_url(tracking_server, run.info.experiment_id, ui_sweep["parent_run_id"]))
    body = _wait_text(browser, "Sweep", "ui", "trials table", "Model training")
    assert "Optuna TPE over" in body and "python -m dashboards --parent-run-id" in body
    _shot(browser, "3-sweep-run-overview")
    browser.get(f"{tracking_server}/" + tracking.artifact_link(run.info.experiment_id, ui_sweep["parent_run_id"],
                                                                  "dashboards/val_curves.png"))
    _wait_text(browser, "dashboards", "val_curves.png", "parallel_coordinates.html", "param_importances.png")
    _shot(browser, "4-sweep-dashboards")


def test_the_registered_model_shows_alias_champion(browser, ui_sweep, tracking_server):
    browser.get(f"{tracking_server}/#/models/coop-eurosat")
    body = _wait_text(browser, "coop-eurosat", "Version 1", "champion")
    _shot(browser, "5-registered-model")
    assert "champion-tiny-vit-1shot" in body
    browser.get(f"{tracking_server}/#/models/coop-eurosat/versions/1")
    body = _wait_text(browser, "CoOp prompt for CLIP", "mlflow models serve")
    _shot(browser, "6-model-version")
    assert "1-shot" in body and "champion" in body
