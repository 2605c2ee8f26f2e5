"""Fine-tuning on the tiny run's real checkpoint, features and data files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import BIN, kill_once_written, task_config
from semvlp.tasks.runner import run_task
from semvlp.tasks.common import trained_mode


def test_finetuning_does_not_depend_on_the_global_random_state(tiny_run, tmp_path):
    """A job's process starts from an unseeded RNG; the task's new head must still be the same."""
    results = tiny_run.workdir / "results"
    nlvr2 = next((results / "data").rglob("nlvr2"))
    nlvr2_config = task_config("nlvr2", train_splits=["train"], eval_splits=["dev"], mode="single", epochs=1, batch_size=16, lr=1e-3)
    outcomes = []
    for disturbance in (1, 2):
        torch.manual_seed(disturbance)
        torch.rand(disturbance)
        summary, _ = run_task(
            "nlvr2",
            checkpoint=results / "pretrain" / "semvlp" / "phase2.safetensors",
            files={"train_data": nlvr2 / "train.json", "dev_data": nlvr2 / "dev.json"},
            feature_paths={"nlvr2": results / "features" / "nlvr2.h5"},
            tokenizer_dir=results / "tokenizer",
            task_config=nlvr2_config,
            seed=0,
            max_text_length=24,
            out_dir=tmp_path / str(disturbance),
            model_dir=tmp_path / str(disturbance) / "model",
        )
        predictions = (tmp_path / str(disturbance) / "predictions_dev.csv").read_text()
        outcomes.append((summary["train_loss_last"], predictions))
    assert outcomes[0] == outcomes[1]


def test_auto_mode_is_the_mode_of_the_last_phase(tiny_run, tmp_path):
    """`auto` fine-tunes in the mode the checkpoint last trained, exactly as if that mode were named."""
    results = tiny_run.workdir / "results"
    pretrain = results / "pretrain"
    assert trained_mode(pretrain / "none" / "phase0.safetensors") == "single"  # the initialisation
    assert trained_mode(pretrain / "semvlp" / "phase1.safetensors") == "single"
    assert trained_mode(pretrain / "semvlp" / "phase2.safetensors") == "two"
    nlvr2 = next((results / "data").rglob("nlvr2"))
    outcomes = {}
    for mode in ("auto", "two", "single"):
        summary, _ = run_task(
            "nlvr2",
            checkpoint=pretrain / "semvlp" / "phase2.safetensors",
            files={"train_data": nlvr2 / "train.json", "dev_data": nlvr2 / "dev.json"},
            feature_paths={"nlvr2": results / "features" / "nlvr2.h5"},
            tokenizer_dir=results / "tokenizer",
            task_config=task_config("nlvr2", train_splits=["train"], eval_splits=["dev"], mode=mode, epochs=1, batch_size=16, lr=1e-3),
            seed=0,
            max_text_length=24,
            out_dir=tmp_path / mode,
            model_dir=tmp_path / mode / "model",
        )
        outcomes[mode] = summary
    assert outcomes["auto"]["mode"] == "two"
    assert outcomes["auto"]["train_loss_last"] == outcomes["two"]["train_loss_last"]
    assert outcomes["two"]["train_loss_last"] != outcomes["single"]["train_loss_last"]


def finetune_process(results: Path, out_dir: Path) -> subprocess.Popen:
    """NLVR2 fine-tuning in its own process, one thread, a partial checkpoint every 2 steps."""
    nlvr2 = next((results / "data").rglob("nlvr2"))
    call = dict(
        checkpoint=str(results / "pretrain" / "semvlp" / "phase2.safetensors"),
        files={"train_data": str(nlvr2 / "train.json"), "dev_data": str(nlvr2 / "dev.json")},
        feature_paths={"nlvr2": str(results / "features" / "nlvr2.h5")},
        tokenizer_dir=str(results / "tokenizer"),
        task_config=task_config("nlvr2", train_splits=["train"], eval_splits=["dev"], mode="single", epochs=3, batch_size=8, lr=1e-3,
                                checkpoint_every=2),
        seed=0,
        max_text_length=24,
        out_dir=str(out_dir),
        model_dir=str(out_dir / "model"),
    )
    script = (
        "import json, sys; from semvlp.tasks.runner import run_task; "
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


# ------------------------------------------------------------------------------ saved task models


def data_root(results: Path) -> Path:
    return next(p for p in (results / "data").iterdir() if p.is_dir())


@pytest.mark.parametrize(
    "task, split, predictions, image_set",
    [
        ("vqa", "val2014", "predictions_val2014.json", "coco"),
        ("nlvr2", "dev", "predictions_dev.csv", "nlvr2"),
        ("retrieval", "test", "scores_test.npy", "flickr30k"),
    ],
)
def test_predict_with_a_saved_model_reproduces_the_jobs_predictions_byte_for_byte(tiny_run, tmp_path, task, split, predictions, image_set):
    """`semvlp predict` on a finetune job's model/ (no training) writes the file the job wrote, and
    evaluates it to the job's metrics. One thread, as the job ran."""
    results = tiny_run.workdir / "results"
    job_dir = results / "finetune" / "semvlp" / task / "seed0"
    command = [
        str(BIN / "semvlp"), "predict", task, "--model", str(job_dir / "model"), "--data-root", str(data_root(results)),
        "--split", split, "--features", str(results / "features" / f"{image_set}.h5"), "--out", str(tmp_path), "--evaluate",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / predictions).read_bytes() == (job_dir / predictions).read_bytes()
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["predictions"] == str(tmp_path / predictions)
    assert outcome["results"] == json.loads((job_dir / "metrics.json").read_text())["results"][split]


def test_a_saved_model_of_another_task_is_refused_naming_it(tiny_run, tmp_path):
    results = tiny_run.workdir / "results"
    saved = results / "finetune" / "semvlp" / "gqa" / "seed0" / "model"
    command = [
        str(BIN / "semvlp"), "predict", "vqa", "--model", str(saved), "--data-root", str(data_root(results)),
        "--split", "val2014", "--features", str(results / "features" / "coco.h5"), "--out", str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert result.stderr.strip() == f"semvlp: error: {saved / 'task.json'}: the saved model is a gqa model, not vqa"
    assert not list(tmp_path.iterdir())


def test_a_saved_model_loads_with_its_task_settings(tiny_run):
    from semvlp.tasks.runner import load_task_model

    saved = tiny_run.workdir / "results" / "finetune" / "semvlp" / "vqa" / "seed0" / "model"
    spec, model, info, tokenizer = load_task_model(saved, torch.device("cpu"))
    assert spec.name == "vqa" and spec.implementation().__module__ == "semvlp.tasks.vqa" and not model.training
    assert info["task"] == "vqa" and info["mode"] in ("single", "two") and len(info["answers"]) == model.head[-1].out_features
    assert info["trained_on"]["splits"] == ["train2014"] and info["trained_on"]["examples"] > 0
    assert info["settings"]["min_answer_count"] == 1 and info["settings"]["held_out_images"] is None
    assert tokenizer.vocab_size == model.encoder.config.vocab_size
