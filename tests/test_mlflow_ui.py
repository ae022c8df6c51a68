"""The MLflow dashboard as a person sees it: headless Chromium on the metric charts of a real run of the bundle.

A tiny training logs to a real ``mlflow server``; Chromium opens the run's "Model metrics" tab, saves a screenshot
(``mlflow_run_metrics.png`` in the test's tmp folder, copied to ``$WDM3D_SCREENSHOT_DIR`` when that is set) and the
rendered page. The test checks the picture is a full, non-blank window that shows the run's chart lines, and that the
page's ``loss`` chart plots one point per logged training step. It skips only when no Chromium is installed
(``apt-get install chromium``; ``$WDM3D_CHROMIUM`` names another binary).
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from mlflow_server import mlflow_server
from PIL import Image
from test_bundle import TINY_TRAIN, dataset, workflow  # noqa: F401 (fixture)

# a learning rate that makes the 8-step loss curve visibly fall (seeded: the same curve every time)
TRACKED = {**TINY_TRAIN, "mlflow": True, "log_every": 1, "learning_rate": 2e-3}
EPOCHS = 4  # x 2 iterations: 8 points on the loss chart
WINDOW = (1600, 1200)
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in (os.environ.get("WDM3D_CHROMIUM"), *BROWSERS):
        if name and (path := shutil.which(name)):
            return path
    return None


def capture(browser: str, url: str, png: Path, profile: Path, budget_ms: int) -> str:
    """Load `url` headless, write a WINDOW-sized screenshot to `png` and return the rendered DOM."""
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--virtual-time-budget={budget_ms}",
        "--hide-scrollbars",
        # without these a cold page is often captured before its charts have fetched their data
        "--run-all-compositor-stages-before-draw",
        "--disable-renderer-backgrounding",
        "--disable-background-timer-throttling",
        "--disable-backgrounding-occluded-windows",
        "--dump-dom",
        f"--screenshot={png}",
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and png.is_file(), f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout


def chart_card(dom: str, title: str) -> str | None:
    """The HTML of the chart card whose title is `title` (MLflow 3's run page: one card per metric)."""
    for card in dom.split('data-testid="experiment-view-compare-runs-card"')[1:]:
        if f'title="{title}"' in card.split("</h4>", 1)[0]:
            return card
    return None


def test_the_dashboard_shows_the_runs_loss_chart(dataset, tmp_path):  # noqa: F811 (pytest injects the fixture)
    browser = find_chromium()
    if browser is None:
        pytest.skip("no Chromium found (tried $WDM3D_CHROMIUM, " + ", ".join(BROWSERS) + "): apt-get install chromium")

    png = tmp_path / "mlflow_run_metrics.png"
    with mlflow_server(tmp_path / "mlflow") as (server, _):
        out = tmp_path / "out"
        wf = workflow(
            ["train.json"],
            "training",
            dataset_dir=str(dataset),
            output_dir=str(out),
            max_epochs=EPOCHS,
            tracking_uri=server,
            **TRACKED,
        )
        wf.run()
        info = json.loads((out / "mlflow_run.json").read_text())
        client = MlflowClient(tracking_uri=server)
        run = client.get_run(info["run_id"])
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
        assert steps == list(range(1, 2 * EPOCHS + 1))

        page = f"{server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/model-metrics"
        for attempt, budget in enumerate((20_000, 60_000)):  # a second, longer look if the charts were not drawn yet
            dom = capture(browser, page, png, tmp_path / f"chromium-profile-{attempt}", budget)
            card = chart_card(dom, "loss")
            if card is not None and 'class="js-line"' in card:
                break
    print(f"\nMLflow dashboard screenshot: {png}  ({page})")
    if os.environ.get("WDM3D_SCREENSHOT_DIR"):
        target = Path(os.environ["WDM3D_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(png, target / png.name)
        print(f"copied to {target / png.name}")

    # the picture: a full window, not blank
    with Image.open(png) as im:
        assert im.size == WINDOW, im.size
        rgb = np.asarray(im.convert("RGB")).astype(np.int16)
    assert rgb.std() > 10, f"the screenshot is (nearly) uniform: std {rgb.std():.1f}"
    assert (rgb.min(axis=-1) < 200).mean() > 0.005, "the screenshot is (nearly) all white"

    # the page: this run, and its loss chart with one point per logged step
    assert info["run_name"] in dom, "the page does not name the run"
    card = chart_card(dom, "loss")
    assert card is not None, f"no chart titled 'loss' on {page}; look at {png}"
    line = re.search(r'class="js-line" d="M([^"]+)"[^>]*stroke: (rgb\(\d+, \d+, \d+\))', card)
    assert line, f"the loss chart has no plotted line; look at {png}"
    points = line[1].split("L")
    assert len(points) == len(steps), f"the loss line has {len(points)} points, MLflow has {len(steps)} steps"
    # and the picture shows lines in the run's colour (plots, not just page furniture)
    color = np.array([int(c) for c in re.findall(r"\d+", line[2])], dtype=np.int16)
    drawn = (np.abs(rgb - color).max(axis=-1) <= 24).sum()
    assert drawn > 3000, f"only {drawn} pixels in the run's line colour {tuple(color)}: are the charts drawn? {png}"
