"""Fine-tuning on the tiny run's real checkpoint, features and data files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import kill_once_written
from semvlp.tasks import run_task
from semvlp.tasks.common import trained_mode


def test_finetuning_does_not_depend_on_the_global_random_state(tiny_run, tmp_path):
    """A job's process starts from an unseeded RNG; the task's new head must still be the same."""
    results = tiny_run.workdir / "results"
    nlvr2 = next((results / "data").rglob("nlvr2"))
    task_config = dict(train_split="train", eval_splits=["dev"], mode="single", epochs=1, batch_size=16, lr=1e-3, weight_decay=0.01, warmup_ratio=0.1)
    outcomes = []
    for disturbance in (1, 2):
        torch.manual_seed(disturbance)
        torch.rand(disturbance)
        summary, _ = run_task(
            "nlvr2",
            checkpoint=results / "pretrain" / "semvlp" / "phase2.pt",
            files={"train_data": nlvr2 / "train.json", "dev_data": nlvr2 / "dev.json"},
            features_path=results / "features" / "nlvr2.h5",
            tokenizer_dir=results / "tokenizer",
            task_config=task_config,
            seed=0,
            max_text_length=24,
            out_dir=tmp_path / str(disturbance),
        )
        predictions = (tmp_path / str(disturbance) / "predictions_dev.csv").read_text()
        outcomes.append((summary["train_loss_last"], predictions))
    assert outcomes[0] == outcomes[1]


def test_auto_mode_is_the_mode_of_the_last_phase(tiny_run, tmp_path):
    """`auto` fine-tunes in the mode the checkpoint last trained, exactly as if that mode were named."""
    results = tiny_run.workdir / "results"
    pretrain = results / "pretrain"
    assert trained_mode(pretrain / "none" / "phase0.pt") == "single"  # the initialisation
    assert trained_mode(pretrain / "semvlp" / "phase1.pt") == "single"
    assert trained_mode(pretrain / "semvlp" / "phase2.pt") == "two"
    nlvr2 = next((results / "data").rglob("nlvr2"))
    outcomes = {}
    for mode in ("auto", "two", "single"):
        summary, _ = run_task(
            "nlvr2",
            checkpoint=pretrain / "semvlp" / "phase2.pt",
            files={"train_data": nlvr2 / "train.json", "dev_data": nlvr2 / "dev.json"},
            features_path=results / "features" / "nlvr2.h5",
            tokenizer_dir=results / "tokenizer",
            task_config=dict(train_split="train", eval_splits=["dev"], mode=mode, epochs=1, batch_size=16, lr=1e-3, weight_decay=0.01, warmup_ratio=0.1),
            seed=0,
            max_text_length=24,
            out_dir=tmp_path / mode,
        )
        outcomes[mode] = summary
    assert outcomes["auto"]["mode"] == "two"
    assert outcomes["auto"]["train_loss_last"] == outcomes["two"]["train_loss_last"]
    assert outcomes["two"]["train_loss_last"] != outcomes["single"]["train_loss_last"]


def finetune_process(results: Path, out_dir: Path) -> subprocess.Popen:
    """NLVR2 fine-tuning in its own process, one thread, a partial checkpoint every 2 steps."""
    nlvr2 = next((results / "data").rglob("nlvr2"))
    call = dict(
        checkpoint=str(results / "pretrain" / "semvlp" / "phase2.pt"),
        files={"train_data": str(nlvr2 / "train.json"), "dev_data": str(nlvr2 / "dev.json")},
        features_path=str(results / "features" / "nlvr2.h5"),
        tokenizer_dir=str(results / "tokenizer"),
        task_config=dict(train_split="train", eval_splits=["dev"], mode="single", epochs=3, batch_size=8, lr=1e-3,
                         weight_decay=0.01, warmup_ratio=0.1, checkpoint_every=2),
        seed=0,
        max_text_length=24,
        out_dir=str(out_dir),
    )
    script = (
        "import json, sys; from semvlp.tasks import run_task; "
        f"summary, _ = run_task('nlvr2', **json.loads({json.dumps(json.dumps(call))})); "
        f"open({str(out_dir / 'summary.json')!r}, 'w').write(json.dumps(summary))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_finetuning_resumes_to_the_same_predictions(tiny_run, tmp_path):
    results = tiny_run.workdir / "results"
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    reference = finetune_process(results, uninterrupted)
    _, stderr = reference.communicate(timeout=600)
    assert reference.returncode == 0, stderr

    proc = finetune_process(results, killed)
    partial = killed / "train.partial"
    kill_once_written(proc, partial)
    assert partial.exists(), "fine-tuning finished or failed before its first partial checkpoint"
    assert not (killed / "predictions_dev.csv").exists()

    resumed = finetune_process(results, killed)
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    assert "resuming nlvr2 at step" in stdout
    assert (killed / "predictions_dev.csv").read_text() == (uninterrupted / "predictions_dev.csv").read_text()
    assert json.loads((killed / "summary.json").read_text()) == json.loads((uninterrupted / "summary.json").read_text())
    assert not partial.exists()
