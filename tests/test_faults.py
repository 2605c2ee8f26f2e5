"""Faults: a job killed mid-way, a folder that refuses writes, a full disk.

A killed job must leave nothing under an output name that a rerun would trust (outputs are written to
`.tmp-*` names and renamed when complete), and the rerun must finish the work (a pre-training phase
resumes from its periodic `<checkpoint>.partial`). A write that fails for lack of space or permission
must say so, name the file, and leave the folder's earlier outputs intact.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

import semvlp
from conftest import BIN
from semvlp.features import FeatureReader, FeatureWriter, RegionRecord
from semvlp.io import file_digest
from semvlp.model import SemVLPConfig, read_weights_metadata, save_weights
from test_reruns import snakemake, snapshot

# config/tiny.yaml: coco_train + coco_val images, extracted in 2 shards
COCO_IMAGES = 80 + 24


@dataclass
class BackgroundRun:
    """Snakemake started in its own process group (to kill the run at once), output to a file."""

    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text()[-6000:]


def start_snakemake(checkout: Path, workdir: Path, *args: str) -> BackgroundRun:
    """Start Snakemake as test_reruns.snakemake runs it, without waiting for it."""
    cmd = [str(BIN / "snakemake"), "--snakefile", str(checkout / "Snakefile"), "--directory", str(workdir), *args]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(checkout)
    log = workdir.parent / f"{workdir.name}.snakemake.log"
    with open(log, "w") as out:  # a file, not a pipe: nobody reads while it runs
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return BackgroundRun(process, log)


def wait_for(condition, run: BackgroundRun, what: str, timeout: float = 900.0):
    """Poll `condition()` every 20 ms until it returns something truthy; fail if the run ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run.process.poll() is not None:
            pytest.fail(f"the run ended before {what}:\n{run.output()}")
        found = condition()
        if found:
            return found
        time.sleep(0.02)
    os.killpg(run.process.pid, signal.SIGKILL)
    pytest.fail(f"timed out waiting for {what}")


def process_writing(run: BackgroundRun, folder: Path, prefix: str) -> psutil.Process | None:
    """The job process of `run` that holds open a file in `folder` whose name starts with `prefix`."""
    try:
        processes = psutil.Process(run.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for process in processes:
        try:
            files = process.open_files()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(Path(f.path).parent == folder and Path(f.path).name.startswith(prefix) for f in files):
            return process
    return None


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return snapshot(tmp_path_factory.mktemp("checkout"))


@pytest.fixture(scope="module")
def tiny(checkout) -> str:
    return str(checkout / "config" / "tiny.yaml")


@pytest.fixture(scope="module")
def prepared_run(checkout, tiny, tmp_path_factory) -> Path:
    """A tiny run up to semvlp's initial checkpoint: data, detector, coco and gqa features."""
    workdir = tmp_path_factory.mktemp("faults-base")
    target = "results/pretrain/semvlp/phase0.safetensors"
    result = snakemake(checkout, workdir, target, "--cores", "2", "--configfile", tiny, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    return workdir


# ------------------------------------------------------------------------------------ killed jobs


@pytest.mark.slow
def test_extraction_killed_mid_write_leaves_no_shard_and_the_rerun_completes(checkout, tiny, prepared_run, tmp_path):
    workdir = shutil.copytree(prepared_run, tmp_path / "run", symlinks=True)
    folder = workdir / "results" / "features" / "coco"
    shard = folder / "shard0.h5"
    # so that the shard's extraction runs again (an intermediate file missing under an up-to-date
    # output would not make Snakemake rerun it)
    shard.unlink()
    (workdir / "results" / "features" / "coco.h5").unlink()
    run = start_snakemake(checkout, workdir, "results/features/coco.h5", "--cores", "2", "--configfile", tiny)
    victim = wait_for(lambda: process_writing(run, folder, ".tmp-shard0.h5-"), run, "the shard's writer started")
    victim.kill()  # SIGKILL, mid-write: no Python cleanup runs
    assert run.process.wait(timeout=600) != 0, run.output()

    # nothing under the output name; whatever the job wrote is under a temporary name
    assert not shard.exists()
    # the one file the job was writing when it died, under a name no rule reads
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-shard0.h5-"), leftovers

    rerun = snakemake(checkout, workdir, "results/features/coco.h5", "--cores", "2", "--configfile", tiny, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-8000:]
    shards = [FeatureReader(folder / f"shard{k}.h5") for k in range(2)]
    merged = FeatureReader(workdir / "results" / "features" / "coco.h5")
    assert len(merged) == sum(len(s) for s in shards) == COCO_IMAGES
    assert set(merged.ids) == set(shards[0].ids) | set(shards[1].ids)
    assert (merged.get(shards[0].ids[-1]).features == shards[0].get(shards[0].ids[-1]).features).all()


@pytest.mark.slow
def test_run_killed_during_a_phase_resumes_from_the_partial_checkpoint(checkout, tiny, prepared_run, tmp_path):
    workdir = shutil.copytree(prepared_run, tmp_path / "run", symlinks=True)
    # long enough that the phase is still training after its first periodic checkpoint
    override = tmp_path / "long_phase.yaml"
    override.write_text(yaml.safe_dump({"pretrain": {"phase": {"steps": 200, "checkpoint_every": 10}}}))
    target = "results/pretrain/semvlp/phase1.safetensors"
    checkpoint = workdir / target
    partial = Path(f"{checkpoint}.partial")
    args = (target, "--cores", "2", "--configfile", tiny, str(override))

    run = start_snakemake(checkout, workdir, *args)
    wait_for(partial.is_file, run, "the phase wrote its first periodic checkpoint")
    os.killpg(run.process.pid, signal.SIGKILL)  # Snakemake and its job at once, like a lost node
    run.process.wait(timeout=60)

    assert not checkpoint.exists() and not (workdir / "results/pretrain/semvlp/phase1.metrics.json").exists()
    assert partial.is_file()
    # a killed Snakemake leaves its lock behind; --unlock is the documented way to release it
    unlock = snakemake(checkout, workdir, "--unlock", *args, timeout=300)
    assert unlock.returncode == 0, unlock.stderr[-4000:]
    rerun = snakemake(checkout, workdir, *args, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-8000:]

    log = (workdir / "results/logs/pretrain_phase/semvlp/phase1.log").read_text()
    assert "resuming phase 1 (single) at step" in log, log[-3000:]
    summary = read_weights_metadata(checkpoint)["history"][-1]["summary"]
    assert summary["steps"] == 200 and summary["resumed_from_step"] >= 10
    assert not partial.exists()


# ------------------------------------------------------------------------- refused and failed writes


def _record(img_id: str, boxes: int, dim: int) -> RegionRecord:
    return RegionRecord(
        img_id=img_id,
        img_h=64,
        img_w=64,
        boxes=np.tile(np.array([0, 0, 8, 8], dtype=np.float32), (boxes, 1)),  # (boxes, 4)
        features=np.full((boxes, dim), 0.5, dtype=np.float32),  # (boxes, dim)
        obj_ids=np.zeros(boxes),
        obj_confs=np.ones(boxes),
        attr_ids=np.zeros(boxes),
        attr_confs=np.ones(boxes),
    )


def write_features(path: Path, images: int, dim: int) -> None:
    """A feature file through the real writer: `images` rows of 4 boxes with `dim` float32 features."""
    sizes = dict(num_images=images, max_boxes=4, feature_dim=dim, feature_dtype="float32")
    with FeatureWriter(path, **sizes, provenance={}) as writer:
        for row in range(images):
            writer.write(row, _record(f"img{row}", 4, dim))


def save_checkpoint(path: Path, parameters: int) -> None:
    """A checkpoint saved the way semvlp.pretrain saves one (semvlp.model.save_weights)."""
    module = torch.nn.Linear(parameters, 1, bias=False)
    save_weights(module, path, SemVLPConfig(vocab_size=10), step=1)


def write_earlier_outputs(folder: Path) -> dict[str, str]:
    """A finished feature file and checkpoint in `folder`; returns every file's digest."""
    write_features(folder / "earlier.h5", images=3, dim=8)
    save_checkpoint(folder / "earlier.safetensors", parameters=100)
    return {p.name: file_digest(p) for p in folder.iterdir()}


def assert_earlier_outputs_intact(folder: Path, digests: dict[str, str]) -> None:
    assert {name: file_digest(folder / name) for name in digests} == digests
    assert len(FeatureReader(folder / "earlier.h5")) == 3
    assert read_weights_metadata(folder / "earlier.safetensors")["step"] == 1
    assert sorted(p.name for p in folder.iterdir()) == sorted(digests)  # no temporary or partial file


def test_writes_into_a_folder_that_refuses_them_fail_clearly(tmp_path):
    folder = tmp_path / "outputs"
    digests = write_earlier_outputs(folder)
    # root ignores permission bits; an immutable folder refuses new entries even to root
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this file system")
    try:
        with pytest.raises(PermissionError, match="permission denied") as features_error:
            write_features(folder / "new.h5", images=2, dim=8)
        with pytest.raises(PermissionError, match="permission denied") as checkpoint_error:
            save_checkpoint(folder / "phase1.safetensors", parameters=100)
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    assert str(folder / "new.h5") in str(features_error.value)
    assert str(folder / "phase1.safetensors") in str(checkpoint_error.value)
    assert_earlier_outputs_intact(folder, digests)


@pytest.fixture
def full_disk(tmp_path):
    """A folder on a 1 MiB tmpfs (skipped where mounting is not permitted)."""
    folder = tmp_path / "tiny-fs"
    folder.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield folder
    finally:
        # lazy: a failed writer may still hold its (deleted) temporary file open until collected
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def test_checkpoint_bigger_than_the_free_space_fails_clearly(full_disk):
    digests = write_earlier_outputs(full_disk)
    target = full_disk / "phase1.safetensors"
    with pytest.raises(OSError, match="disk full") as error:
        save_checkpoint(target, parameters=600_000)  # 2.4 MB of float32
    assert error.value.errno == errno.ENOSPC
    assert str(target) in str(error.value)
    assert not target.exists()
    assert_earlier_outputs_intact(full_disk, digests)


# HDF5 is left with a file it could not close; run the writer in a child so that no state survives.
_WRITE_FEATURES = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_faults import write_features
write_features(Path({path!r}), images={images}, dim=1024)  # images x 4 boxes x 1024 float32: 16 KiB each
"""


def _write_features_in_child(path: Path, images: int) -> subprocess.CompletedProcess:
    code = _WRITE_FEATURES.format(tests=str(Path(__file__).resolve().parent), path=str(path), images=images)
    env = {**os.environ, "PYTHONPATH": str(Path(semvlp.__file__).resolve().parents[1])}  # the package under test
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_feature_file_bigger_than_the_free_space_fails_clearly(full_disk):
    write_earlier_outputs(full_disk)
    # fill the disk but for a few hundred KiB, so the writer fails partway through its data
    with open(full_disk / "filler", "wb") as f:
        f.write(b"\0" * (shutil.disk_usage(full_disk).free - 300 * 1024))
    digests = {p.name: file_digest(p) for p in full_disk.iterdir()}
    target = full_disk / "coco.h5"
    result = _write_features_in_child(target, images=40)
    assert result.returncode != 0
    error = [line for line in result.stderr.splitlines() if line.startswith(f"OSError: [Errno {errno.ENOSPC}]")]
    assert error and "disk full: no space left on device" in error[-1], result.stderr[-3000:]
    assert error[-1].endswith(f"'{target}'"), error[-1]
    assert not target.exists()
    assert_earlier_outputs_intact(full_disk, digests)


def test_feature_writer_on_a_full_disk_exits_without_crashing(full_disk):
    result = _write_features_in_child(full_disk / "big.h5", images=100)
    assert result.returncode == 1, f"exit status {result.returncode}"
