"""MLflow tracking: one experiment per workflow config, one parent run per `snakemake` invocation,
one child run per job.

The experiment and the parent run are created by the Snakefile's `onstart` handler (in the Snakemake
process, before any job starts, so the experiment and the SQLite schema are never created by parallel
jobs). The parent's id reaches the jobs through the environment variable SEMVLP_PARENT_RUN_ID and, for
jobs that do not inherit the environment (cluster jobs), through `results/.tracking/invocation.json`.
Jobs find the experiment through the parent run, so they never create it.

Runs are written through `MlflowClient` (never the fluent `mlflow.start_run` API, whose global
active-run state does not fit one run per job plus a parent opened in another process).

Backends: a tracking server (`tracking.uri` in the config, else MLFLOW_TRACKING_URI) or, by default,
the SQLite file `results/mlflow.db` with artifacts in `results/mlartifacts`. Parallel jobs write to
that file concurrently; MLflow sets the SQLite busy timeout of every session to 20 s (overriding the
`timeout` in the URI), so a write that waits longer fails with "database is locked". Every store call
here is retried on that error until SQLITE_TIMEOUT_S has passed.

Tracking can be switched off (`tracking.enabled: false`); jobs then log nothing, create no store and
their run-id files hold an empty line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from semvlp.io import config_digest, read_json, write_json

PARENT_ENV = "SEMVLP_PARENT_RUN_ID"
INVOCATION_FILE = Path("results/.tracking/invocation.json")
DEFAULT_STORE = Path("results/mlflow.db")
# Artifacts of a SQLite store live in this folder next to the database file, one subfolder per
# experiment (MLflow's own default,
# ./mlruns in whatever directory the first client ran in, would scatter them).
SQLITE_ARTIFACT_DIR = "mlartifacts"
# Seconds a store call keeps retrying while parallel jobs hold the SQLite lock.
SQLITE_TIMEOUT_S = 120
# Metrics are buffered and written in batches: at this many values, or when the oldest buffered
# value is this old (so a long training run still shows progress in the UI).
METRICS_BUFFER_SIZE = 200
METRICS_FLUSH_INTERVAL_S = 30.0
# MLflow's limits (mlflow.utils.validation).
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_MAX_PARAM_LENGTH = 6000
_MAX_TAG_LENGTH = 8000
# The prefix MLflow's UI gathers in its "System metrics" tab.
SYSTEM_METRIC_PREFIX = "system/"
# GPU utilisation needs NVML (torch.cuda.utilization reads it through pynvml); memory needs only torch.
_HAVE_NVML = importlib.util.find_spec("pynvml") is not None

T = TypeVar("T")


# ----------------------------------------------------------------------------------------- store


def tracking_uri(config: dict[str, Any]) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI, else a SQLite file under results/."""
    uri = config["tracking"].get("uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    DEFAULT_STORE.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{DEFAULT_STORE.resolve()}?timeout={SQLITE_TIMEOUT_S}"


def _is_lock_error(error: BaseException) -> bool:
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import OperationalError

    return isinstance(error, (MlflowException, OperationalError)) and "database is locked" in str(error)


def _retry_locked(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`call(*args, **kwargs)`, retried while SQLite reports "database is locked".

    Safe to repeat: MLflow rolls the failed transaction back before raising.
    """
    deadline = time.monotonic() + SQLITE_TIMEOUT_S
    pause_s = 0.05
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as error:
            if not _is_lock_error(error) or time.monotonic() + pause_s > deadline:
                raise
        # Jitter keeps jobs that failed together from retrying in lockstep.
        time.sleep(pause_s * random.uniform(0.5, 1.5))
        pause_s = min(2 * pause_s, 2.0)


def _client(config: dict[str, Any]):
    from mlflow.tracking import MlflowClient

    # Opening a SQLite store reads (and on a fresh file writes) the schema: it can meet the lock too.
    return _retry_locked(MlflowClient, tracking_uri=tracking_uri(config))


def _artifact_location(uri: str, experiment: str) -> str | None:
    """`mlartifacts/<experiment>` next to a SQLite database file; None (the server's choice) otherwise."""
    if not uri.startswith("sqlite:///"):
        return None
    db_path = Path(uri[len("sqlite:///") :].split("?", 1)[0]).resolve()
    return (db_path.parent / SQLITE_ARTIFACT_DIR / experiment).as_uri()


def _experiment_id(client, name: str, artifact_location: str | None) -> str:
    """Get or create the experiment; a concurrent creator is tolerated (its experiment is used)."""
    from mlflow.exceptions import MlflowException

    experiment = _retry_locked(client.get_experiment_by_name, name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return _retry_locked(client.create_experiment, name, artifact_location=artifact_location)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return _retry_locked(client.get_experiment_by_name, name).experiment_id


# ------------------------------------------------------------------------------------ invocation


def git_state() -> tuple[str, str]:
    """(commit, "true"/"false" for uncommitted changes) of the repository holding this package."""
    repo_dir = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, timeout=10)
        status_cmd = ["git", "status", "--porcelain", "--untracked-files=no"]
        status = subprocess.run(status_cmd, cwd=repo_dir, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", "unknown"
    if commit.returncode != 0:
        return "unknown", "unknown"
    dirty = "unknown" if status.returncode != 0 else str(bool(status.stdout.strip())).lower()
    return commit.stdout.strip(), dirty


def begin_invocation(config: dict[str, Any], targets: Sequence[str] = ()) -> str | None:
    """Create the experiment (once) and the invocation's parent run; returns its id.

    The parent run carries the config (as params and as `config.json`), its digest, the git commit,
    the command line and the requested targets.
    """
    if not config["tracking"]["enabled"]:
        return None
    from mlflow.entities import Param

    uri = tracking_uri(config)
    client = _client(config)
    experiment_id = _experiment_id(client, config["experiment"], _artifact_location(uri, config["experiment"]))
    commit, dirty = git_state()
    tags = {
        "semvlp.kind": "invocation",
        "semvlp.config_digest": config_digest(config),
        "semvlp.git_commit": commit,
        "semvlp.git_dirty": dirty,
        "semvlp.command": " ".join(sys.argv),
        "semvlp.targets": " ".join(sorted(targets)),
    }
    run = _retry_locked(
        client.create_run,
        experiment_id,
        run_name=f"snakemake {time.strftime('%Y-%m-%d %H:%M:%S')}",
        tags={k: v[:_MAX_TAG_LENGTH] for k, v in tags.items()},
    )
    run_id = run.info.run_id
    params = [Param(k, v) for k, v in sorted(flatten_params(config).items())]
    for start in range(0, len(params), _PARAMS_PER_BATCH):
        _retry_locked(client.log_batch, run_id, params=params[start : start + _PARAMS_PER_BATCH])
    _retry_locked(client.log_dict, run_id, config, "config.json")
    os.environ[PARENT_ENV] = run_id
    write_json(INVOCATION_FILE, {"parent_run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri})
    return run_id


def end_invocation(config: dict[str, Any], success: bool) -> None:
    """Close the parent run with the invocation's outcome; child runs still RUNNING become KILLED.

    A job killed by a signal (Snakemake stopping on an error, a cluster time limit) cannot close its
    own run, so without this its run would stay RUNNING forever.
    """
    run_id = parent_run_id()
    if not config["tracking"]["enabled"] or not run_id:
        return
    client = _client(config)
    parent = _retry_locked(client.get_run, run_id)
    orphans = _retry_locked(
        client.search_runs,
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{run_id}' and attributes.status = 'RUNNING'",
    )
    for child in orphans:
        _retry_locked(client.set_terminated, child.info.run_id, status="KILLED")
    _retry_locked(client.set_terminated, run_id, status="FINISHED" if success else "FAILED")


def parent_run_id() -> str | None:
    """The current invocation's parent run id (environment first, then the invocation file)."""
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    if INVOCATION_FILE.is_file():
        return read_json(INVOCATION_FILE).get("parent_run_id")
    return None


# ------------------------------------------------------------------------------------------- jobs


def flatten_params(params: dict[str, Any]) -> dict[str, str]:
    """Nested dicts become dotted keys ({"a": {"b": 1}} -> {"a.b": "1"}); lists become JSON."""
    flat: dict[str, str] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                visit(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            text = json.dumps(value, default=str) if isinstance(value, (list, tuple)) else str(value)
            flat[prefix] = text[:_MAX_PARAM_LENGTH]

    visit("", params)
    return flat


class SystemMetricsSampler(threading.Thread):
    """Background thread logging CPU, memory and (when this process uses CUDA) GPU metrics of a run.

    MLflow's own system-metrics monitor follows the fluent active run; this one writes to a run id
    through the client, every `interval_s` seconds and once more when stopped.
    """

    def __init__(self, client, run_id: str, interval_s: float):
        super().__init__(name="semvlp-system-metrics", daemon=True)
        import psutil

        self._client = client
        self._run_id = run_id
        self._interval_s = interval_s
        self._stop_event = threading.Event()
        self._process = psutil.Process()
        self._step = 0
        psutil.cpu_percent(interval=None)  # starts the CPU-time window the first sample reads

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def run(self) -> None:
        while not self._stop_event.wait(self._interval_s):
            self._log_sample()
        self._log_sample()

    def sample(self) -> dict[str, float]:
        import psutil

        memory = psutil.virtual_memory()
        rss = self._process.memory_info().rss
        for child in self._process.children(recursive=True):  # data-loader workers, torchrun ranks
            with contextlib.suppress(psutil.Error):
                rss += child.memory_info().rss
        values = {
            "cpu_utilization_percentage": psutil.cpu_percent(interval=None),
            "system_memory_usage_megabytes": (memory.total - memory.available) / 1e6,
            "system_memory_usage_percentage": memory.percent,
            "process_memory_rss_megabytes": rss / 1e6,
        }
        values.update(_gpu_sample())
        return {SYSTEM_METRIC_PREFIX + name: float(value) for name, value in values.items()}

    def _log_sample(self) -> None:
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, self._step) for key, value in self.sample().items()]
        self._step += 1
        try:
            _retry_locked(self._client.log_batch, self._run_id, metrics=metrics)
        except MlflowException as error:  # a lost sample must not end the sampling (nor the job)
            print(f"semvlp.tracking: system metrics not logged: {error}", file=sys.stderr)


def _gpu_sample() -> dict[str, float]:
    """Memory of the CUDA devices this process uses, plus utilisation when NVML (pynvml) is present.

    Only devices whose memory this process already holds are read, so sampling never creates a
    CUDA context (hundreds of MB) on a GPU the job does not use.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return {}
    values: dict[str, float] = {}
    for device in range(torch.cuda.device_count()):
        if torch.cuda.memory_reserved(device) == 0:
            continue
        free, total = torch.cuda.mem_get_info(device)
        values[f"gpu_{device}_memory_usage_megabytes"] = (total - free) / 1e6
        values[f"gpu_{device}_memory_usage_percentage"] = 100.0 * (total - free) / total
        values[f"gpu_{device}_process_allocated_megabytes"] = torch.cuda.memory_allocated(device) / 1e6
        if _HAVE_NVML:
            values[f"gpu_{device}_utilization_percentage"] = torch.cuda.utilization(device)
    return values


class JobRun:
    """The MLflow run of one job. With tracking off every method does nothing and run_id is ''."""

    def __init__(self, client, run_id: str):
        self._client = client
        self.run_id = run_id
        self._pending: list = []
        self._oldest_pending = 0.0
        self._sampler: SystemMetricsSampler | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        """Nested dicts are flattened to dotted keys (see `flatten_params`)."""
        if not self._client:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(flatten_params(params).items())]
        for start in range(0, len(items), _PARAMS_PER_BATCH):
            _retry_locked(self._client.log_batch, self.run_id, params=items[start : start + _PARAMS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Buffered: written every METRICS_BUFFER_SIZE values or METRICS_FLUSH_INTERVAL_S seconds,
        and when the run ends (keeps SQLite writes few)."""
        if not self._client:
            return
        from mlflow.entities import Metric

        now = time.time()
        if not self._pending:
            self._oldest_pending = now
        self._pending += [Metric(k, float(v), int(now * 1000), step or 0) for k, v in metrics.items()]
        if len(self._pending) >= METRICS_BUFFER_SIZE or now - self._oldest_pending >= METRICS_FLUSH_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        if self._client and self._pending:
            for start in range(0, len(self._pending), _METRICS_PER_BATCH):
                _retry_locked(self._client.log_batch, self.run_id, metrics=self._pending[start : start + _METRICS_PER_BATCH])
            self._pending = []

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self._client:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:_MAX_TAG_LENGTH]) for k, v in tags.items()]
        for start in range(0, len(items), _PARAMS_PER_BATCH):
            _retry_locked(self._client.log_batch, self.run_id, tags=items[start : start + _PARAMS_PER_BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (a missing one is skipped: an optional output must not fail the job)."""
        if self._client and Path(path).is_file():
            _retry_locked(self._client.log_artifact, self.run_id, str(path), artifact_path)

    def log_artifact_to(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file to another job's run (one of this invocation's or an earlier one's); nothing
        when that job ran with tracking off (no run id)."""
        if self._client and run_id and Path(path).is_file():
            _retry_locked(self._client.log_artifact, run_id, str(path), artifact_path)

    def _start_system_metrics(self, interval_s: float) -> None:
        self._sampler = SystemMetricsSampler(self._client, self.run_id, interval_s)
        self._sampler.start()

    def _close(self, status: str) -> None:
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None
        self.flush()
        _retry_locked(self._client.set_terminated, self.run_id, status=status)


@contextlib.contextmanager
def job_run(
    config: dict[str, Any],
    run_name: str,
    tags: dict[str, Any],
    *,
    system_metrics: bool = False,
    system_metrics_interval_s: float = 10.0,
) -> Iterator[JobRun]:
    """A child run of the invocation's parent run: FINISHED on success, FAILED on an exception
    (KILLED on KeyboardInterrupt), with the exception recorded in the tag `semvlp.error`.

    `system_metrics` samples CPU, memory and GPU every `system_metrics_interval_s` seconds in a
    background thread that stops when the block ends (use it for training jobs).
    """
    if not config["tracking"]["enabled"]:
        yield JobRun(None, "")
        return
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(config)
    client = _client(config)
    all_tags = {k: str(v)[:_MAX_TAG_LENGTH] for k, v in tags.items()}
    parent = parent_run_id()
    experiment_id = None
    if parent:
        try:
            experiment_id = _retry_locked(client.get_run, parent).info.experiment_id
            all_tags["mlflow.parentRunId"] = parent
        except MlflowException as error:
            # A stale invocation file from another store: log the job unparented rather than fail it.
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
    if experiment_id is None:
        experiment_id = _experiment_id(client, config["experiment"], _artifact_location(uri, config["experiment"]))
    run = _retry_locked(client.create_run, experiment_id, run_name=run_name, tags=all_tags)
    job = JobRun(client, run.info.run_id)
    if system_metrics:
        job._start_system_metrics(system_metrics_interval_s)
    try:
        yield job
    except BaseException as error:
        job.set_tags({"semvlp.error": f"{type(error).__name__}: {error}"})
        job._close("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    job._close("FINISHED")


def read_run_id(path: str | Path) -> str:
    """The run id a job wrote next to its output ('' when missing or written with tracking off)."""
    path = Path(path)
    return path.read_text().strip() if path.is_file() else ""
