"""MLflow tracking on real stores: SQLite files (one per test, copied from a store whose schema was
created once), concurrent job processes, and a real `mlflow server` over HTTP."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from conftest import BIN, REPO
from semvlp import tracking
from semvlp.io import read_json, write_text

TEMPLATE_NAME = "mlflow.db"


# ------------------------------------------------------------------------------------------ helpers


def make_config(uri: str | None, enabled: bool = True) -> dict[str, Any]:
    """The repository's default workflow config with the given tracking settings."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["tracking"] = {"enabled": enabled, "uri": uri}
    return config


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def metric_steps(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the server's whole process group (mlflow server 3.x forks uvicorn and worker processes)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever ignored SIGTERM, leader included
    proc.wait(timeout=10)


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """A real `mlflow server` on a free loopback port, its store and artifacts under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    cmd = [
        str(BIN / "mlflow"), "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]
    # The server's background job runner (GenAI evaluation jobs) is not needed and costs processes.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError):
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server not healthy after 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        _kill_group(proc)


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test runs in its own directory (results/ lands there) with no tracking variables set."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # setenv (not delenv) so that the id begin_invocation exports is removed again after the test.
    monkeypatch.setenv(tracking.PARENT_ENV, "")
    return tmp_path


@pytest.fixture(scope="session")
def store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store with its schema (running the migrations takes seconds: do it once)."""
    path = tmp_path_factory.mktemp("template") / TEMPLATE_NAME
    client_for(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def default_store(store_template: Path, tmp_path: Path) -> Path:
    """A fresh store at the default location, results/mlflow.db of the test's directory."""
    path = tmp_path / tracking.DEFAULT_STORE
    path.parent.mkdir(parents=True)
    shutil.copy(store_template, path)
    return path


# ------------------------------------------------------------------------------------- unit tests


def test_uri_precedence_config_then_environment_then_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    default = f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}?timeout={tracking.SQLITE_TIMEOUT_S}"
    assert tracking.tracking_uri(make_config(None)) == default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.tracking_uri(make_config(None)) == "http://127.0.0.1:1"
    assert tracking.tracking_uri(make_config("sqlite:////elsewhere/m.db")) == "sqlite:////elsewhere/m.db"


def test_params_flatten_nested_dicts_and_lists():
    nested = {"model": {"hidden": 32, "heads": {"itm": True}}, "phases": ["single", "two"], "lr": 5e-4}
    flat = tracking.flatten_params(nested)
    assert flat == {"model.hidden": "32", "model.heads.itm": "True", "phases": '["single", "two"]', "lr": "0.0005"}
    assert len(tracking.flatten_params({"long": "x" * 10_000})["long"]) == 6000  # MLflow's limit


def test_run_id_file_contents(tmp_path: Path):
    path = tmp_path / "checkpoint.pt.run_id"
    assert tracking.read_run_id(path) == ""  # missing
    write_text(path, "\n")  # what a job writes with tracking off
    assert tracking.read_run_id(path) == ""
    write_text(path, "0123abcd\n")
    assert tracking.read_run_id(path) == "0123abcd"


def test_tracking_disabled_creates_no_store(tmp_path: Path):
    config = make_config(None, enabled=False)
    assert tracking.begin_invocation(config) is None
    artifact = tmp_path / "a.txt"
    artifact.write_text("x")
    with tracking.job_run(config, "report", {"semvlp.rule": "report"}, system_metrics=True) as job:
        assert job.run_id == ""
        job.log_params({"a": {"b": 1}})
        job.log_metrics({"loss": 1.0}, step=3)
        job.set_tags({"t": 1})
        job.log_artifact(artifact)
        job.flush()
    tracking.end_invocation(config, success=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # no results/, mlruns/, invocation file
    assert os.environ[tracking.PARENT_ENV] == ""
    assert not any(t.name == "semvlp-system-metrics" for t in threading.enumerate())


def test_invocation_parent_and_child_runs_with_lineage(default_store: Path, tmp_path: Path):
    config = make_config(None)
    parent_id = tracking.begin_invocation(config, targets=["results/all.tsv"])
    assert os.environ[tracking.PARENT_ENV] == parent_id
    invocation = read_json(tmp_path / tracking.INVOCATION_FILE)
    assert invocation["parent_run_id"] == parent_id
    assert invocation["tracking_uri"] == tracking.tracking_uri(config)

    client = client_for(tracking.tracking_uri(config))
    parent = client.get_run(parent_id)
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.name == config["experiment"]
    artifact_root = tmp_path / "results" / "mlartifacts" / config["experiment"]
    assert experiment.artifact_location == artifact_root.as_uri()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert parent.data.tags["semvlp.git_commit"] == head
    assert parent.data.tags["semvlp.git_dirty"] in ("true", "false")
    assert parent.data.tags["semvlp.config_digest"] == tracking.config_digest(config)
    assert parent.data.tags["semvlp.targets"] == "results/all.tsv"
    assert parent.data.tags["semvlp.kind"] == "invocation"
    assert parent.data.params["pretrain.phase.steps"] == str(config["pretrain"]["phase"]["steps"])
    assert parent.data.params["regions.image_sets"] == json.dumps(config["regions"]["image_sets"])
    assert json.loads(Path(client.download_artifacts(parent_id, "config.json", str(tmp_path))).read_text()) == config

    # An upstream job (pre-training phase) and a downstream one (fine-tuning) that reads its run id.
    checkpoint = tmp_path / "phase1.pt"
    with tracking.job_run(config, "pretrain_phase variant=semvlp index=1", {"semvlp.rule": "pretrain_phase"}) as upstream:
        write_text(f"{checkpoint}.run_id", upstream.run_id + "\n")  # as semvlp.jobs writes it
        for step in range(5):
            upstream.log_metrics({"loss": 5.0 - step, "lr": 1e-4}, step=step)
    predictions = tmp_path / "predictions_val.json"
    predictions.write_text('{"1": "yes"}')
    tags = {"semvlp.rule": "finetune", "semvlp.stage": "finetune", "semvlp.variant": "semvlp"}
    tags |= {"semvlp.task": "vqa", "semvlp.seed": 0}
    with tracking.job_run(config, "finetune variant=semvlp task=vqa seed=0", tags) as job:
        job.log_params({"task_config": {"mode": "two", "optimizer": {"lr": 5e-5}}, "seeds": [0, 1]})
        job.set_tags({"semvlp.upstream_run_id": tracking.read_run_id(f"{checkpoint}.run_id"), "semvlp.mode": "two"})
        job.log_metrics({"val.accuracy": 0.5}, step=0)
        job.log_metrics({"val.accuracy": 0.75}, step=1)
        job.log_artifact(predictions, "predictions")
        job.log_artifact(tmp_path / "missing.json")  # skipped, not an error

    assert tracking.read_run_id(f"{checkpoint}.run_id") == upstream.run_id
    child = client.get_run(job.run_id)
    assert child.info.status == "FINISHED"
    assert child.info.run_name == "finetune variant=semvlp task=vqa seed=0"
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert child.data.tags["semvlp.upstream_run_id"] == upstream.run_id
    assert {k: child.data.tags[k] for k in tags} == {k: str(v) for k, v in tags.items()}
    assert child.data.params == {"task_config.mode": "two", "task_config.optimizer.lr": "5e-05", "seeds": "[0, 1]"}
    assert metric_steps(client, job.run_id, "val.accuracy") == [(0, 0.5), (1, 0.75)]
    assert metric_steps(client, upstream.run_id, "loss") == [(s, 5.0 - s) for s in range(5)]
    assert [a.path for a in client.list_artifacts(job.run_id, "predictions")] == ["predictions/predictions_val.json"]
    stored = artifact_root / job.run_id / "artifacts" / "predictions"
    assert (stored / "predictions_val.json").read_text() == '{"1": "yes"}'

    assert client.get_run(parent_id).info.status == "RUNNING"
    tracking.end_invocation(config, success=True)
    assert client.get_run(parent_id).info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert sorted(r.info.run_id for r in children) == sorted([upstream.run_id, job.run_id])


def test_failed_job_and_failed_invocation(default_store: Path):
    config = make_config(None)
    parent_id = tracking.begin_invocation(config)
    client = client_for(tracking.tracking_uri(config))
    with pytest.raises(ValueError, match="boom"):
        with tracking.job_run(config, "finetune", {}, system_metrics=True, system_metrics_interval_s=0.05) as job:
            job.log_metrics({"loss": 2.0}, step=0)
            raise ValueError("boom")
    failed = client.get_run(job.run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["semvlp.error"] == "ValueError: boom"
    assert metric_steps(client, job.run_id, "loss") == [(0, 2.0)]  # buffered values survive the failure
    assert not any(t.name == "semvlp-system-metrics" for t in threading.enumerate())

    # A job killed by a signal never leaves its block: its run is still RUNNING when Snakemake stops.
    killed = tracking.job_run(config, "pretrain_phase", {"semvlp.rule": "pretrain_phase"})
    orphan = killed.__enter__()
    assert client.get_run(orphan.run_id).info.status == "RUNNING"
    tracking.end_invocation(config, success=False)
    assert client.get_run(parent_id).info.status == "FAILED"
    assert client.get_run(orphan.run_id).info.status == "KILLED"


def test_metrics_are_buffered_and_flushed_on_exit(default_store: Path):
    config = make_config(None)
    tracking.begin_invocation(config)
    client = client_for(tracking.tracking_uri(config))
    with tracking.job_run(config, "pretrain_phase", {}) as job:
        for step in range(10):
            job.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        assert client.get_metric_history(job.run_id, "loss") == []  # still buffered: no write per step
        for step in range(10, tracking.METRICS_BUFFER_SIZE):
            job.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        assert len(client.get_metric_history(job.run_id, "loss")) == tracking.METRICS_BUFFER_SIZE  # a full buffer is written
        job.log_metrics({"loss": 0.0}, step=tracking.METRICS_BUFFER_SIZE)
        assert len(client.get_metric_history(job.run_id, "loss")) == tracking.METRICS_BUFFER_SIZE
    history = metric_steps(client, job.run_id, "loss")
    assert [s for s, _ in history] == list(range(tracking.METRICS_BUFFER_SIZE + 1))
    assert history[-1] == (tracking.METRICS_BUFFER_SIZE, 0.0)


def test_system_metrics_sampled_in_background_until_the_run_ends(default_store: Path):
    config = make_config(None)
    tracking.begin_invocation(config)
    client = client_for(tracking.tracking_uri(config))
    with tracking.job_run(config, "pretrain_phase", {}, system_metrics=True, system_metrics_interval_s=0.1) as job:
        assert any(t.name == "semvlp-system-metrics" and t.is_alive() for t in threading.enumerate())
        deadline = time.monotonic() + 60
        # Keep a core busy (CPU utilisation visibly above zero) until the thread has logged 3 samples.
        while len(client.get_metric_history(job.run_id, "system/cpu_utilization_percentage")) < 3:
            assert time.monotonic() < deadline, "the sampler logged fewer than 3 samples in 60 s"
            sum(i * i for i in range(100_000))
    assert not any(t.name == "semvlp-system-metrics" for t in threading.enumerate())
    cpu = metric_steps(client, job.run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 4  # and one more when the run ended
    assert [s for s, _ in cpu] == list(range(len(cpu)))
    assert max(v for _, v in cpu) > 0
    assert all(v > 0 for _, v in metric_steps(client, job.run_id, "system/process_memory_rss_megabytes"))
    assert all(0 < v <= 100 for _, v in metric_steps(client, job.run_id, "system/system_memory_usage_percentage"))
    time.sleep(0.3)
    assert len(client.get_metric_history(job.run_id, "system/cpu_utilization_percentage")) == len(cpu)  # stopped


# ------------------------------------------------------------------------------------ concurrency

PARALLEL_JOBS = 6
STEPS = 100
# Longer than the 20-s SQLite busy timeout MLflow sets on each session.
LOCK_HOLD_S = 22.0


def _parallel_job(config: dict[str, Any], index: int, start: Any, artifact: str) -> None:
    """One job process: a child run with params, STEPS steps of metrics and an artifact."""
    with tracking.job_run(config, f"job {index}", {"semvlp.rule": "parallel", "semvlp.index": index}) as job:
        start.wait()  # all processes write at the same moment
        job.log_params({"index": index, "optimizer": {"lr": 1e-4 * (index + 1), "betas": [0.9, 0.999]}})
        for step in range(STEPS):
            job.log_metrics({"loss": index + 1.0 / (step + 1), "step_time": 0.01 * step}, step=step)
            if step % 10 == 9:
                job.flush()  # many small write transactions: the worst case for lock contention
        job.set_tags({"semvlp.done": "yes"})
        job.log_artifact(artifact, "outputs")


@pytest.mark.slow
def test_parallel_jobs_share_one_sqlite_store(default_store: Path, tmp_path: Path):
    config = make_config(None)
    parent_id = tracking.begin_invocation(config)  # as Snakemake's onstart does, before jobs fan out
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(PARALLEL_JOBS)
    artifacts = []
    for index in range(PARALLEL_JOBS):
        artifacts.append(tmp_path / f"out_{index}.txt")
        artifacts[-1].write_text(f"output of job {index}\n")
    workers = [
        context.Process(target=_parallel_job, args=(config, index, start, str(artifacts[index])))
        for index in range(PARALLEL_JOBS)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=180)
    assert [w.exitcode for w in workers] == [0] * PARALLEL_JOBS

    client = client_for(tracking.tracking_uri(config))
    experiment_id = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert len(runs) == PARALLEL_JOBS
    assert sorted(int(r.data.tags["semvlp.index"]) for r in runs) == list(range(PARALLEL_JOBS))
    for run in runs:
        index = int(run.data.tags["semvlp.index"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["semvlp.done"] == "yes"
        assert run.data.params["optimizer.lr"] == str(1e-4 * (index + 1))
        assert metric_steps(client, run.info.run_id, "loss") == [(s, index + 1.0 / (s + 1)) for s in range(STEPS)]
        assert len(client.get_metric_history(run.info.run_id, "step_time")) == STEPS
        local = client.download_artifacts(run.info.run_id, f"outputs/out_{index}.txt", str(tmp_path / "check"))
        assert Path(local).read_text() == f"output of job {index}\n"


@pytest.mark.slow
def test_write_blocked_longer_than_mlflow_busy_timeout_is_retried(default_store: Path):
    """MLflow sets SQLite's busy timeout to 20 s per session (whatever the URI says): a write waiting
    longer fails on its own, and lands through tracking's retry."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    config = make_config(None)
    tracking.begin_invocation(config)
    client = client_for(tracking.tracking_uri(config))
    with tracking.job_run(config, "finetune", {}) as job:
        job.log_metrics({"loss": 1.0}, step=0)
        holder = sqlite3.connect(default_store, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN EXCLUSIVE")  # another writer holding the database (a long transaction)
        release = threading.Timer(LOCK_HOLD_S, holder.commit)
        release.start()
        started = time.monotonic()
        with pytest.raises(MlflowException, match="database is locked"):
            client.log_batch(job.run_id, metrics=[Metric("unretried", 1.0, 0, 0)])
        assert time.monotonic() - started < LOCK_HOLD_S
        job.flush()  # blocks past MLflow's timeout, retried until the lock is released
        assert time.monotonic() - started >= LOCK_HOLD_S
        release.join()
        holder.close()
    assert metric_steps(client, job.run_id, "loss") == [(0, 1.0)]
    assert client.get_run(job.run_id).info.status == "FINISHED"


# ------------------------------------------------------------------------------------------ server


@pytest.mark.slow
def test_jobs_log_over_http_to_an_mlflow_server(tmp_path: Path):
    with mlflow_server(tmp_path / "server") as url:
        config = make_config(url)
        parent_id = tracking.begin_invocation(config)
        artifact = tmp_path / "metrics.json"
        artifact.write_text('{"accuracy": 0.5}')
        tags = {"semvlp.task": "nlvr2", "semvlp.seed": 1}
        sampled = {"system_metrics": True, "system_metrics_interval_s": 0.2}
        with tracking.job_run(config, "finetune task=nlvr2 seed=1", tags, **sampled) as job:
            job.log_params({"task_config": {"epochs": 2}})
            for step in range(20):
                job.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            job.log_artifact(artifact)
            client = client_for(url)
            deadline = time.monotonic() + 60
            while not client.get_metric_history(job.run_id, "system/cpu_utilization_percentage"):
                assert time.monotonic() < deadline, "no system metrics sample in 60 s"
                time.sleep(0.1)
        tracking.end_invocation(config, success=True)

        parent = client.get_run(parent_id)
        child = client.get_run(job.run_id)
        assert parent.info.status == child.info.status == "FINISHED"
        assert client.get_experiment(parent.info.experiment_id).name == config["experiment"]
        assert child.data.tags["mlflow.parentRunId"] == parent_id
        assert child.data.tags["semvlp.seed"] == "1"
        assert child.data.params == {"task_config.epochs": "2"}
        assert metric_steps(client, job.run_id, "loss") == [(s, 1.0 / (s + 1)) for s in range(20)]
        assert len(client.get_metric_history(job.run_id, "system/cpu_utilization_percentage")) >= 2  # + the final one
        downloaded = client.download_artifacts(job.run_id, "metrics.json", str(tmp_path / "download"))
        assert Path(downloaded).read_text() == '{"accuracy": 0.5}'
    # Artifacts went through the server to its destination; nothing was written locally.
    assert list((tmp_path / "server" / "artifacts").rglob("metrics.json"))
    assert not (tmp_path / "results" / "mlflow.db").exists()
