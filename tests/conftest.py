"""Shared test helpers: repository paths and a Snakemake runner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run_snakemake(workdir: Path, *args: str, timeout: int = 1200, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the repository's Snakefile in `workdir` (its results/ go there)."""
    cmd = [str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    full_env = {**os.environ, **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


TINY = str(REPO / "config" / "tiny.yaml")


def task_config(task: str, **values) -> dict:
    """A task's section of the validated default config (every key, the schema's defaults included),
    with `values` set: what the finetune rule passes to semvlp.tasks.runner.run_task."""
    import yaml

    from semvlp.config import validate_config

    config = validate_config(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    return {**config["finetune"]["tasks"][task], **values}


@pytest.fixture
def repo() -> Path:
    return REPO


@dataclass
class TinyRun:
    workdir: Path
    seconds: float  # wall time of the run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    """One complete run of config/tiny.yaml with jobs in parallel (--cores 4), shared by the tests."""
    workdir = tmp_path_factory.mktemp("tiny-run")
    start = time.perf_counter()
    # the target comes before --configfile, which takes every path after it
    result = run_snakemake(workdir, "results/all.tsv", "--cores", "4", "--configfile", TINY, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    return TinyRun(workdir, time.perf_counter() - start)


def kill_once_written(proc, path: Path, timeout: float = 300) -> None:
    """SIGKILL `proc` as soon as `path` exists (or once it exits or `timeout` passes), and reap it."""
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
