"""GQA: classifier over the training answers, exact-match targets, cross-entropy; exact-match accuracy."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import nn

from semvlp.batching import RegionBank, encode_text
from semvlp.data.answers import AnswerTable
from semvlp.data.formats import load_gqa
from semvlp.io import write_json
from semvlp.metrics import evaluate_gqa
from semvlp.tasks.common import Encoder, TaskSettings, batches_of, classifier_head, train

IMAGE_SET = "gqa"


class GQAModel(nn.Module):
    def __init__(self, encoder: Encoder, num_answers: int):
        super().__init__()
        self.encoder = encoder
        self.head = classifier_head(encoder.hidden_size, 2 * encoder.hidden_size, num_answers)

    def forward(self, batch) -> torch.Tensor:
        return self.head(self.encoder(batch).pooled)  # [B, A]


def run(checkpoint, files, features_path, tokenizer, settings: TaskSettings, out_dir, job=None):
    out_dir = Path(out_dir)
    train_questions = load_gqa(files[f"{settings.train_split}_questions"])
    table = AnswerTable.from_counts(Counter(q.answer for q in train_questions), 1)
    examples = [q for q in train_questions][: settings.max_train_examples]

    encoder = Encoder(checkpoint, settings.mode)
    bank = RegionBank({IMAGE_SET: features_path}, box_dim=encoder.config.box_dim)
    model = GQAModel(encoder, len(table))

    def make_batch(questions):
        batch = bank.batch([(IMAGE_SET, q.img_id) for q in questions])
        batch.update(encode_text(tokenizer, [q.question for q in questions], settings.max_text_length))
        return batch

    def loss_of_batch(chunk):
        labels = torch.tensor([table.index[q.answer] for q in chunk])
        return nn.functional.cross_entropy(model(make_batch(chunk)), labels)

    losses = train(model, examples, loss_of_batch, settings, job, desc="gqa")
    results = {}
    for split in settings.eval_splits:
        path = files[f"{split}_questions"]
        questions = load_gqa(path)
        predictions = []
        with torch.no_grad():
            for chunk in batches_of(questions, 256):
                best = model(make_batch(chunk)).argmax(-1).tolist()
                predictions += [{"questionId": q.question_id, "prediction": table.answers[i]} for q, i in zip(chunk, best)]
        predictions_path = out_dir / f"predictions_{split}.json"
        write_json(predictions_path, predictions)
        results[split] = evaluate_gqa(path, predictions_path)
    return {"train_loss_last": losses[-1], "num_answers": len(table), "num_train": len(examples)}, results
