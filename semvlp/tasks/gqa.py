"""GQA: classifier over the training answers, exact-match targets, cross-entropy; exact-match accuracy."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from torch import nn

from semvlp.data.answers import AnswerTable
from semvlp.data.formats import load_gqa
from semvlp.errors import InputError
from semvlp.io import write_json
from semvlp.metrics import check_gqa_predictions, evaluate_gqa
from semvlp.tasks.common import AnswerClassifier, QuestionAnsweringTask


class GQA(QuestionAnsweringTask):
    name = "gqa"

    def training_examples(self):
        questions = []
        for split in self.settings.train_splits:
            path = self.files[f"{split}_questions"]
            split_questions = load_gqa(path)
            if any(q.answer is None for q in split_questions):
                raise InputError("a training split needs every question's answer", path)
            questions += split_questions
        table = AnswerTable.from_counts(Counter(q.answer for q in questions), 1)
        self.answer_index = table.index
        return questions, {"answers": list(table.answers)}

    def loss(self, model: AnswerClassifier, examples, step: int) -> torch.Tensor:
        logits = model(self.question_batch([(self.spec.image_set, q.img_id, q.question) for q in examples]))
        labels = torch.tensor([self.answer_index[q.answer] for q in examples], device=logits.device)
        return nn.functional.cross_entropy(logits, labels)

    def predict(self, model, info, split, out_dir) -> Path:
        """predictions_{split}.json in the GQA submission format (questionId, prediction)."""
        questions = load_gqa(self.files[f"{split}_questions"])
        answers = self.predict_answers(model, [(self.spec.image_set, q.img_id, q.question) for q in questions], info["answers"])
        path = Path(out_dir) / f"predictions_{split}.json"
        write_json(path, [{"questionId": q.question_id, "prediction": a} for q, a in zip(questions, answers)])
        return path

    def evaluate(self, split, predictions_path, info):
        """Accuracy; for a split without answers (challenge, submission) the local check of the server file."""
        questions = self.files[f"{split}_questions"]
        if all(q.answer is None for q in load_gqa(questions)):
            return check_gqa_predictions(questions, predictions_path)
        return evaluate_gqa(questions, predictions_path)


TASK = GQA
