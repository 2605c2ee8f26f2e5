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
from semvlp.metrics import evaluate_gqa
from semvlp.tasks.common import AnswerClassifier, Encoder, TaskSettings, predict_answers, question_batcher, resume_point, train

IMAGE_SET = "gqa"


def run(checkpoint, files, features_path, tokenizer, settings: TaskSettings, out_dir, job=None):
    out_dir = Path(out_dir)
    train_questions = load_gqa(files[f"{settings.train_split}_questions"])
    table = AnswerTable.from_counts(Counter(q.answer for q in train_questions), 1)
    examples = train_questions[: settings.max_train_examples]

    encoder = Encoder(checkpoint, settings.mode)
    bank = RegionBank({IMAGE_SET: features_path}, box_dim=encoder.config.box_dim)
    model = AnswerClassifier(encoder, len(table))
    make_batch = question_batcher(bank, IMAGE_SET, tokenizer, settings.max_text_length)

    def loss_of_batch(chunk, step):
        logits = model(make_batch(chunk))
        labels = torch.tensor([table.index[q.answer] for q in chunk], device=logits.device)
        return nn.functional.cross_entropy(logits, labels)

    losses = train(model, examples, loss_of_batch, settings, job, desc="gqa", **resume_point(out_dir, checkpoint, task="gqa"))
    results = {}
    for split in settings.eval_splits:
        path = files[f"{split}_questions"]
        questions = load_gqa(path)
        answers = predict_answers(model, questions, make_batch, table.answers)
        predictions_path = out_dir / f"predictions_{split}.json"
        write_json(predictions_path, [{"questionId": q.question_id, "prediction": a} for q, a in zip(questions, answers)])
        results[split] = evaluate_gqa(path, predictions_path)
    return {"train_loss_last": losses[-1], "num_answers": len(table), "num_train": len(examples)}, results
