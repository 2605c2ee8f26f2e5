"""The MLflow UI shows what tracking logged: a real `mlflow server` rendered in headless Chromium.

The page and a screenshot are kept in tests/artifacts/ for a person to look at.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO
from semvlp import tracking
from test_tracking import client_for, make_config, mlflow_server

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "tests" / "artifacts"
# The UI is a JavaScript app: Chromium runs it for this much virtual time (runs load asynchronously)
# before dumping the DOM or taking the screenshot.
VIRTUAL_TIME_MS = 15_000


def chromium() -> Path:
    """Debian's Chromium, installed with apt when missing and running as root."""
    if CHROMIUM.exists():
        return CHROMIUM
    if os.geteuid() != 0:
        pytest.skip(f"{CHROMIUM} is missing and installing it (apt-get install chromium) needs root")
    install = subprocess.run(
        "apt-get update && apt-get install -y chromium",
        shell=True,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    output = install.stdout[-2000:] + install.stderr[-2000:]
    assert install.returncode == 0 and CHROMIUM.exists(), f"installing chromium failed:\n{output}"
    return CHROMIUM


def headless(browser: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium with a throw-away profile and nothing that phones home."""
    cmd = [
        str(browser),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={VIRTUAL_TIME_MS}",
        *args,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"chromium failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return result


def test_ui_lists_the_experiment_with_parent_and_child_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    browser = chromium()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(tracking.PARENT_ENV, "")
    child_names = [
        "pretrain_phase variant=semvlp index=1",
        "finetune variant=semvlp task=vqa seed=0",
        "finetune variant=semvlp task=gqa seed=0",
    ]
    with mlflow_server(tmp_path / "server") as url:
        config = make_config(url)
        parent_id = tracking.begin_invocation(config, targets=["results/all.tsv"])
        for name in child_names[:2]:
            with tracking.job_run(config, name, {"semvlp.rule": name.split()[0]}) as job:
                for step in range(5):
                    job.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        with pytest.raises(RuntimeError):
            with tracking.job_run(config, child_names[2], {"semvlp.rule": "finetune"}):
                raise RuntimeError("out of memory")
        tracking.end_invocation(config, success=False)
        parent = client_for(url).get_run(parent_id)

        # The runs view of the model-training workflow (the UI otherwise opens the GenAI overview).
        # Ordering by name rather than start time makes the table list child runs flat instead of
        # collapsed under their parent, so every run name is in the DOM.
        page = (
            f"{url}/#/experiments/{parent.info.experiment_id}/runs"
            "?workflowType=machine_learning&orderByKey=tags.%60mlflow.runName%60&orderByAsc=true"
        )
        dom = headless(browser, tmp_path / "profile-dom", "--dump-dom", page).stdout
        screenshot = tmp_path / "mlflow_ui_runs.png"
        headless(browser, tmp_path / "profile-shot", f"--screenshot={screenshot}", "--window-size=1600,900", page)

    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "mlflow_ui_runs.html").write_text(dom)
    (ARTIFACTS / "mlflow_ui_runs.png").write_bytes(screenshot.read_bytes())
    assert config["experiment"] in dom
    for name in [parent.info.run_name, *child_names]:
        assert name in dom, f"run {name!r} not shown by the UI (DOM kept in {ARTIFACTS})"
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 20_000  # a rendered page, not a blank one
