"""VQA v2: answer classifier over frequent answers, soft-score targets, BCE; official accuracy."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from semvlp.batching import RegionBank
from semvlp.data.answers import AnswerTable, vqa_targets
from semvlp.data.formats import load_vqa
from semvlp.errors import InputError
from semvlp.io import write_json
from semvlp.metrics import check_vqa_predictions, evaluate_vqa, normalize_vqa_answer
from semvlp.tasks.common import (
    AnswerClassifier, Encoder, TaskSettings, predict_answers, question_batcher, resume_point, task_info, train,
)

IMAGE_SET = "coco"


def answer_table(questions, min_count: int) -> AnswerTable:
    """Answers whose normalised most common annotator answer occurs at least `min_count` times."""
    counts = Counter(normalize_vqa_answer(q.multiple_choice_answer) for q in questions)
    return AnswerTable.from_counts(counts, min_count)


def training_examples(questions_path, annotations_path, min_answer_count: int) -> tuple[AnswerTable, list]:
    """The answer table of a training split and its examples: (question, answer indices, soft scores)
    for every question with an answer in the table."""
    questions = load_vqa(questions_path, annotations_path)
    table = answer_table(questions, min_answer_count)
    if len(table) == 0:
        raise InputError(f"no answer occurs {min_answer_count} times (finetune.tasks.vqa.min_answer_count)", annotations_path)
    # sparse soft targets, (answer indices, scores) per question: a dense vector each would take
    # 443,757 x 3,129 x 4 B ~ 5.5 GB on VQA v2 train
    examples = []
    for q in questions:
        scored = [(table.index[answer], score) for answer, score in vqa_targets(q.answers).items() if answer in table.index and score > 0]
        if scored:  # questions with no answer in the table teach nothing
            indices, scores = zip(*scored)
            examples.append((q, np.array(indices, np.int32), np.array(scores, np.float32)))
    return table, examples


def build_model(encoder: Encoder, info: dict) -> AnswerClassifier:
    return AnswerClassifier(encoder, len(info["answers"]))


def predict(model: AnswerClassifier, info: dict, files, split: str, bank: RegionBank, tokenizer, out_dir) -> Path:
    """predictions_{split}.json in the official results format; needs the split's questions only."""
    questions = load_vqa(files[f"{split}_questions"])
    make_batch = question_batcher(bank, IMAGE_SET, tokenizer, info["max_text_length"])
    answers = predict_answers(model, questions, make_batch, info["answers"])
    path = Path(out_dir) / f"predictions_{split}.json"
    write_json(path, [{"question_id": q.question_id, "answer": a} for q, a in zip(questions, answers)])
    return path


def evaluate(files, split: str, predictions_path, info: dict) -> dict[str, float]:
    """Accuracy; for a test split (no annotations) the local check of the server file instead."""
    if f"{split}_annotations" not in files:
        return check_vqa_predictions(files[f"{split}_questions"], predictions_path)
    return evaluate_vqa(
        files[f"{split}_questions"], files[f"{split}_annotations"], predictions_path,
        legacy_normalization=info["legacy_normalization"],
    )


def run(
    checkpoint, files, features_path, tokenizer, settings: TaskSettings, out_dir, job=None, *, min_answer_count: int,
    legacy_normalization: bool,
):
    split = settings.train_split
    table, examples = training_examples(files[f"{split}_questions"], files[f"{split}_annotations"], min_answer_count)
    examples = examples[: settings.max_train_examples]
    info = task_info(
        "vqa", settings, checkpoint, len(examples), answers=list(table.answers), min_answer_count=min_answer_count,
        legacy_normalization=legacy_normalization,
    )

    encoder = Encoder.from_checkpoint(checkpoint, settings.mode)
    bank = RegionBank({IMAGE_SET: features_path}, box_dim=encoder.config.box_dim)
    model = build_model(encoder, info)
    make_batch = question_batcher(bank, IMAGE_SET, tokenizer, settings.max_text_length)

    def loss_of_batch(chunk, step):
        logits = model(make_batch([q for q, _, _ in chunk]))
        targets = torch.zeros(len(chunk), len(table))  # [B, A], dense for this batch only
        for row, (_, indices, scores) in enumerate(chunk):
            targets[row, torch.from_numpy(indices).long()] = torch.from_numpy(scores)
        targets = targets.to(logits.device)
        # summed over answers, as LXMERT does, so the loss does not shrink with the table size
        return nn.functional.binary_cross_entropy_with_logits(logits, targets) * logits.size(1)

    losses = train(
        model, examples, loss_of_batch, settings, job, desc="vqa",
        **resume_point(out_dir, checkpoint, task="vqa", min_answer_count=min_answer_count),
    )
    results = {split: evaluate(files, split, predict(model, info, files, split, bank, tokenizer, out_dir), info) for split in settings.eval_splits}
    return {"train_loss_last": losses[-1], "num_answers": len(table), "num_train": len(examples)}, results, model, info
