"""Fine-tuning tasks: VQA v2, GQA, NLVR2, Flickr30K retrieval. `run_task` is the one entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from semvlp.tasks import gqa, nlvr2, retrieval, vqa
from semvlp.tasks.common import TaskSettings, trained_mode
from semvlp.tokenization import load_tokenizer

TASKS = {"vqa": vqa, "gqa": gqa, "nlvr2": nlvr2, "retrieval": retrieval}
# Task-specific config keys passed to the task's run() besides the common settings.
EXTRA_KEYS = {"vqa": ("min_answer_count",), "retrieval": ("negatives", "caption_negatives", "hard_negatives", "candidate_pool", "hard_negatives_from_epoch")}


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
    job=None,
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Fine-tune and evaluate; returns (training summary, {eval split: {metric: value}}).

    The summary's `mode` is the encoder mode used: task_config's, or with `auto` the checkpoint's
    last trained one.
    """
    settings = TaskSettings.from_config(task_config, seed=seed, max_text_length=max_text_length)
    if settings.mode == "auto":
        settings.mode = trained_mode(checkpoint)
    extra = {k: task_config[k] for k in EXTRA_KEYS.get(task, ()) if k in task_config}
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)  # the task's new head is initialised before train() seeds the batches
    summary, results = TASKS[task].run(checkpoint, files, features_path, tokenizer, settings, out_dir, job, **extra)
    return {"mode": settings.mode, **summary}, results
