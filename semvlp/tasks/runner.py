"""Run a fine-tuning task (`run_task`), load a saved task model (`load_task_model`) and predict with it
(`predict_task`): the same for every task (semvlp.tasks.common.Task)."""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from semvlp.batching import RegionBank
from semvlp.engine import default_device, file_stamp
from semvlp.errors import InputError
from semvlp.io import read_json
from semvlp.model import CONFIG_NAME, WEIGHTS_NAME, SemVLPConfig, SemVLPForPreTraining, load_weights
from semvlp.tasks import TASKS, TaskSpec, task_spec
from semvlp.tasks.common import TASK_FILE, Encoder, Task, save_task_model, train, trained_mode
from semvlp.tokenization import load_tokenizer


def run_task(
    task: str,
    *,
    checkpoint: str | Path,
    files: dict[str, str | Path],
    feature_paths: dict[str, str | Path],
    tokenizer_dir: str | Path,
    task_config: dict[str, Any],
    seed: int,
    max_text_length: int,
    out_dir: str | Path,
    model_dir: str | Path,
    job=None,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Fine-tune, evaluate every eval split and save the model to `model_dir`; returns (training
    summary, {eval split: metrics}). The summary holds the loss of every step (`loss_history`) and the
    file name of each split's predictions in `out_dir` (`predictions`).

    `task_config` is the validated config's section of the task; `feature_paths` the stores of the
    task's image sets by set. The summary's `mode` is the encoder mode used: the section's, or with
    `auto` the checkpoint's last trained one.
    """
    spec = task_spec(task)
    settings = spec.settings.from_config(task_config, seed=seed, max_text_length=max_text_length)
    if settings.mode == "auto":
        settings.mode = trained_mode(checkpoint)
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)  # the task's new head is initialised before train() seeds the batches
    encoder = Encoder.from_checkpoint(checkpoint, settings.mode)
    runner = spec.implementation()(settings, files, RegionBank(feature_paths, box_dim=encoder.config.box_dim), tokenizer)
    examples, recorded = runner.training_examples()
    examples = examples[: settings.max_train_examples]
    info = {
        "task": task,
        "mode": settings.mode,
        "max_text_length": max_text_length,
        **recorded,
        "trained_on": {"splits": settings.train_splits, "examples": len(examples), "pretrained": file_stamp(checkpoint)},
        "settings": asdict(settings),
    }
    model = runner.build_model(encoder, info)
    losses = train(
        model, examples, lambda chunk, step: runner.loss(model, chunk, step), settings, job, desc=task,
        partial=Path(out_dir) / "train.partial", identity={"checkpoint": file_stamp(checkpoint), "task": task},
        generators=runner.generators,
    )
    predictions, results = {}, {}
    for split in settings.eval_splits:
        path = runner.predict(model, info, split, out_dir)
        predictions[split], results[split] = path.name, runner.evaluate(split, path, info)
    save_task_model(model, model_dir, info, tokenizer)
    summary = {"mode": settings.mode, "train_loss_last": losses[-1], "num_train": len(examples)}
    if "answers" in info:
        summary["num_answers"] = len(info["answers"])
    return {**summary, "predictions": predictions, "loss_history": losses}, results


def load_task_model(model_dir: str | Path, device: torch.device | None = None) -> tuple[TaskSpec, torch.nn.Module, dict, Any]:
    """(task, model in eval mode on `device`, task.json, tokenizer) of a saved task model."""
    model_dir = Path(model_dir)
    info = read_json(model_dir / TASK_FILE)
    if info.get("task") not in TASKS:
        raise InputError(f"unknown task {info.get('task')!r}; expected one of {tuple(TASKS)}", model_dir / TASK_FILE)
    spec = TASKS[info["task"]]
    config = SemVLPConfig.from_dict(read_json(model_dir / CONFIG_NAME), source=model_dir / CONFIG_NAME)
    # the head needs no files or features: only the answer table and such, which task.json holds
    builder = spec.implementation()(saved_settings(spec, info, model_dir / TASK_FILE), {}, None, None)
    model = builder.build_model(Encoder(SemVLPForPreTraining(config), info["mode"]), info)
    load_weights(model, model_dir / WEIGHTS_NAME)
    return spec, model.to(device or default_device()).eval(), info, load_tokenizer(model_dir)


def saved_settings(spec: TaskSpec, info: dict[str, Any], path: Path):
    """The task settings a saved model was trained with (task.json's `settings`)."""
    saved = info.get("settings", {})
    missing = [f.name for f in fields(spec.settings) if f.name not in saved]
    if missing:
        raise InputError(f"settings lack {', '.join(missing)}: saved by an older version of semvlp, fine-tune it again", path)
    return spec.settings(**{f.name: saved[f.name] for f in fields(spec.settings)})


def predict_task(
    model_dir: str | Path,
    *,
    task: str,
    split: str,
    files: dict[str, str | Path],
    feature_paths: dict[str, str | Path],
    out_dir: str | Path,
    evaluate: bool = False,
) -> dict[str, Any]:
    """Predict `split` with a saved `task` model (on the GPU when there is one); with `evaluate`, also
    score the predictions against the split's labels. Returns the predictions' path (and metrics)."""
    spec, model, info, tokenizer = load_task_model(model_dir)
    if spec.name != task:
        raise InputError(f"the saved model is a {spec.name} model, not {task}", Path(model_dir) / TASK_FILE)
    settings = saved_settings(spec, info, Path(model_dir) / TASK_FILE)
    runner: Task = spec.implementation()(settings, files, RegionBank(feature_paths, box_dim=model.encoder.config.box_dim), tokenizer)
    path = runner.predict(model, info, split, out_dir)
    result: dict[str, Any] = {"task": task, "split": split, "predictions": str(path)}
    if evaluate:
        result["results"] = runner.evaluate(split, path, info)
    return result
