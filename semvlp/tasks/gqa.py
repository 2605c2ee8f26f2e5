"""GQA: classifier over the training answers, exact-match targets, cross-entropy; exact-match accuracy."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import nn

from semvlp.batching import RegionBank
from semvlp.data.answers import AnswerTable
from semvlp.data.formats import load_gqa
from semvlp.io import write_json
from semvlp.metrics import check_gqa_predictions, evaluate_gqa
from semvlp.tasks.common import (
    AnswerClassifier, Encoder, TaskSettings, predict_answers, question_batcher, resume_point, task_info, train,
)

IMAGE_SET = "gqa"


def build_model(encoder: Encoder, info: dict) -> AnswerClassifier:
    return AnswerClassifier(encoder, len(info["answers"]))


def predict(model: AnswerClassifier, info: dict, files, split: str, bank: RegionBank, tokenizer, out_dir) -> Path:
    """predictions_{split}.json in the GQA submission format (questionId, prediction)."""
    questions = load_gqa(files[f"{split}_questions"])
    make_batch = question_batcher(bank, IMAGE_SET, tokenizer, info["max_text_length"])
    answers = predict_answers(model, questions, make_batch, info["answers"])
    path = Path(out_dir) / f"predictions_{split}.json"
    write_json(path, [{"questionId": q.question_id, "prediction": a} for q, a in zip(questions, answers)])
    return path


def evaluate(files, split: str, predictions_path, info: dict) -> dict[str, float]:
    """Accuracy; for a split without answers (challenge, submission) the local check of the server file."""
    if all(q.answer is None for q in load_gqa(files[f"{split}_questions"])):
        return check_gqa_predictions(files[f"{split}_questions"], predictions_path)
    return evaluate_gqa(files[f"{split}_questions"], predictions_path)


def run(checkpoint, files, features_path, tokenizer, settings: TaskSettings, out_dir, job=None):
    train_questions = load_gqa(files[f"{settings.train_split}_questions"])
    table = AnswerTable.from_counts(Counter(q.answer for q in train_questions), 1)
    examples = train_questions[: settings.max_train_examples]
    info = task_info("gqa", settings, checkpoint, len(examples), answers=list(table.answers))

    encoder = Encoder.from_checkpoint(checkpoint, settings.mode)
    bank = RegionBank({IMAGE_SET: features_path}, box_dim=encoder.config.box_dim)
    model = build_model(encoder, info)
    make_batch = question_batcher(bank, IMAGE_SET, tokenizer, settings.max_text_length)

    def loss_of_batch(chunk, step):
        logits = model(make_batch(chunk))
        labels = torch.tensor([table.index[q.answer] for q in chunk], device=logits.device)
        return nn.functional.cross_entropy(logits, labels)

    losses = train(model, examples, loss_of_batch, settings, job, desc="gqa", **resume_point(out_dir, checkpoint, task="gqa"))
    results = {split: evaluate(files, split, predict(model, info, files, split, bank, tokenizer, out_dir), info) for split in settings.eval_splits}
    return {"train_loss_last": losses[-1], "num_answers": len(table), "num_train": len(examples)}, results, model, info
