"""Fine-tuning tasks: VQA v2, GQA, NLVR2, Flickr30K retrieval.

`run_task` fine-tunes, evaluates and saves the model; `predict_task` predicts another split with a
saved model, without training. Each task module has the same four functions: `build_model(encoder,
info)`, `predict(model, info, files, split, bank, tokenizer, out_dir) -> path`, `evaluate(files,
split, path, info) -> metrics` and `run(...)`. Task modules are imported when used, so a job's code (and
its rerun fingerprint, semvlp.fingerprint) holds its own task only.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from semvlp.batching import RegionBank
from semvlp.engine import default_device
from semvlp.errors import InputError
from semvlp.io import read_json
from semvlp.model import CONFIG_NAME, WEIGHTS_NAME, SemVLPConfig, SemVLPForPreTraining, load_weights
from semvlp.tasks.common import TASK_FILE, Encoder, TaskSettings, save_task_model, trained_mode
from semvlp.tokenization import load_tokenizer

TASKS = ("vqa", "gqa", "nlvr2", "retrieval")
# Task-specific config keys passed to the task's run() besides the common settings.
EXTRA_KEYS = {"vqa": ("min_answer_count", "legacy_normalization"), "retrieval": ("negatives", "caption_negatives", "hard_negatives", "candidate_pool", "hard_negatives_from_epoch")}


def task_module(task: str) -> ModuleType:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return importlib.import_module(f"semvlp.tasks.{task}")


def run_task(
    task: str,
    *,
    checkpoint: str | Path,
    files: dict[str, str | Path],
    features_path: str | Path,
    tokenizer_dir: str | Path,
    task_config: dict[str, Any],
    seed: int,
    max_text_length: int,
    out_dir: str | Path,
    model_dir: str | Path,
    job=None,
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Fine-tune, evaluate and save the model to `model_dir`; returns (training summary, {eval split:
    {metric: value}}).

    `task_config` is the validated config's section of the task (every key present). The summary's
    `mode` is the encoder mode used: task_config's, or with `auto` the checkpoint's last trained one.
    """
    settings = TaskSettings.from_config(task_config, seed=seed, max_text_length=max_text_length)
    if settings.mode == "auto":
        settings.mode = trained_mode(checkpoint)
    extra = {key: task_config[key] for key in EXTRA_KEYS.get(task, ())}
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)  # the task's new head is initialised before train() seeds the batches
    summary, results, model, info = task_module(task).run(checkpoint, files, features_path, tokenizer, settings, out_dir, job, **extra)
    save_task_model(model, model_dir, info, tokenizer)
    return {"mode": settings.mode, **summary}, results


def load_task_model(model_dir: str | Path, device: torch.device | None = None):
    """(task module, model in eval mode on `device`, task info, tokenizer) of a saved task model."""
    model_dir = Path(model_dir)
    info = read_json(model_dir / TASK_FILE)
    if info.get("task") not in TASKS:
        raise InputError(f"unknown task {info.get('task')!r}; expected one of {TASKS}", model_dir / TASK_FILE)
    config = SemVLPConfig.from_dict(read_json(model_dir / CONFIG_NAME), source=model_dir / CONFIG_NAME)
    module = task_module(info["task"])
    model = module.build_model(Encoder(SemVLPForPreTraining(config), info["mode"]), info)
    load_weights(model, model_dir / WEIGHTS_NAME)
    return module, model.to(device or default_device()).eval(), info, load_tokenizer(model_dir)


def predict_task(
    model_dir: str | Path,
    *,
    task: str,
    split: str,
    files: dict[str, str | Path],
    features_path: str | Path,
    out_dir: str | Path,
    evaluate: bool = False,
) -> dict[str, Any]:
    """Predict `split` with a saved `task` model (on the GPU when there is one); with `evaluate`, also
    score the predictions against the split's labels. Returns the predictions' path (and metrics)."""
    module, model, info, tokenizer = load_task_model(model_dir)
    if info["task"] != task:
        raise InputError(f"the saved model is a {info['task']} model, not {task}", Path(model_dir) / TASK_FILE)
    bank = RegionBank({module.IMAGE_SET: features_path}, box_dim=model.encoder.config.box_dim)
    path = module.predict(model, info, files, split, bank, tokenizer, out_dir)
    result: dict[str, Any] = {"task": task, "split": split, "predictions": str(path)}
    if evaluate:
        result["results"] = module.evaluate(files, split, path, info)
    return result
