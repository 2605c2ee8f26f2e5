"""VQA v2: answer classifier over frequent answers, soft-score targets, BCE; official accuracy."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import nn

from semvlp.batching import RegionBank, encode_text
from semvlp.data.answers import AnswerTable, vqa_targets
from semvlp.data.formats import load_vqa
from semvlp.errors import InputError
from semvlp.io import write_json
from semvlp.metrics import evaluate_vqa, normalize_vqa_answer
from semvlp.tasks.common import Encoder, TaskSettings, batches_of, classifier_head, train

IMAGE_SET = "coco"


def answer_table(questions, min_count: int) -> AnswerTable:
    """Answers whose normalised most common annotator answer occurs at least `min_count` times."""
    counts = Counter(normalize_vqa_answer(q.multiple_choice_answer) for q in questions)
    return AnswerTable.from_counts(counts, min_count)


class VQAModel(nn.Module):
    def __init__(self, encoder: Encoder, num_answers: int):
        super().__init__()
        self.encoder = encoder
        self.head = classifier_head(encoder.hidden_size, 2 * encoder.hidden_size, num_answers)

    def forward(self, batch) -> torch.Tensor:
        return self.head(self.encoder(batch).pooled)  # [B, A]


def run(checkpoint, files, features_path, tokenizer, settings: TaskSettings, out_dir, job=None, min_answer_count: int = 9):
    out_dir = Path(out_dir)
    split = settings.train_split
    train_questions = load_vqa(files[f"{split}_questions"], files[f"{split}_annotations"])
    table = answer_table(train_questions, min_answer_count)
    if len(table) == 0:
        raise InputError(f"no answer occurs {min_answer_count} times (finetune.tasks.vqa.min_answer_count)", files[f"{split}_annotations"])
    examples = []
    for q in train_questions:
        target = torch.zeros(len(table))
        for answer, score in vqa_targets(q.answers).items():
            if answer in table.index:
                target[table.index[answer]] = score
        if target.any():  # questions with no answer in the table teach nothing
            examples.append((q, target))
    examples = examples[: settings.max_train_examples]

    encoder = Encoder(checkpoint, settings.mode)
    bank = RegionBank({IMAGE_SET: features_path}, box_dim=encoder.config.box_dim)
    model = VQAModel(encoder, len(table))

    def make_batch(questions):
        batch = bank.batch([(IMAGE_SET, q.img_id) for q in questions])
        batch.update(encode_text(tokenizer, [q.question for q in questions], settings.max_text_length))
        return batch

    def loss_of_batch(chunk):
        logits = model(make_batch([q for q, _ in chunk]))
        targets = torch.stack([t for _, t in chunk])
        # summed over answers, as LXMERT does, so the loss does not shrink with the table size
        return nn.functional.binary_cross_entropy_with_logits(logits, targets) * logits.size(1)

    losses = train(model, examples, loss_of_batch, settings, job, desc="vqa")
    results = {}
    for split in settings.eval_splits:
        questions_path, annotations_path = files[f"{split}_questions"], files[f"{split}_annotations"]
        questions = load_vqa(questions_path, annotations_path)
        predictions = []
        with torch.no_grad():
            for chunk in batches_of(questions, 256):
                best = model(make_batch(chunk)).argmax(-1).tolist()
                predictions += [{"question_id": q.question_id, "answer": table.answers[i]} for q, i in zip(chunk, best)]
        predictions_path = out_dir / f"predictions_{split}.json"
        write_json(predictions_path, predictions)
        results[split] = evaluate_vqa(questions_path, annotations_path, predictions_path)
    return {"train_loss_last": losses[-1], "num_answers": len(table), "num_train": len(examples)}, results
