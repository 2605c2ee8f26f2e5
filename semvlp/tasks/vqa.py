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
from semvlp.metrics import evaluate_vqa, normalize_vqa_answer
from semvlp.tasks.common import AnswerClassifier, Encoder, TaskSettings, predict_answers, question_batcher, resume_point, train

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


def run(checkpoint, files, features_path, tokenizer, settings: TaskSettings, out_dir, job=None, min_answer_count: int = 9):
    out_dir = Path(out_dir)
    split = settings.train_split
    table, examples = training_examples(files[f"{split}_questions"], files[f"{split}_annotations"], min_answer_count)
    examples = examples[: settings.max_train_examples]

    encoder = Encoder(checkpoint, settings.mode)
    bank = RegionBank({IMAGE_SET: features_path}, box_dim=encoder.config.box_dim)
    model = AnswerClassifier(encoder, len(table))
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
    results = {}
    for split in settings.eval_splits:
        questions_path, annotations_path = files[f"{split}_questions"], files[f"{split}_annotations"]
        questions = load_vqa(questions_path, annotations_path)
        answers = predict_answers(model, questions, make_batch, table.answers)
        predictions_path = out_dir / f"predictions_{split}.json"
        write_json(predictions_path, [{"question_id": q.question_id, "answer": a} for q, a in zip(questions, answers)])
        results[split] = evaluate_vqa(questions_path, annotations_path, predictions_path)
    return {"train_loss_last": losses[-1], "num_answers": len(table), "num_train": len(examples)}, results
