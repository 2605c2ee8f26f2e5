"""VQA v2: answer classifier over frequent answers, soft-score targets, BCE; official accuracy.

Training questions come from every training split, minus the questions on `held_out_images`, plus
with `vg_qa` Visual Genome's QAs (answer score 1, the one annotator agreeing with itself) on VG images
that are none of the evaluation images. An evaluation split that is also a training split is scored on
its held-out images only: LXMERT's recipe, train2014 + val2014 trained on, a 5,000-image minival kept out.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn

from semvlp.data.answers import AnswerTable, vqa_targets
from semvlp.data.corpus import HeldOutImages
from semvlp.data.formats import VQAQuestion, load_vg_images, load_vg_qa, load_vqa
from semvlp.errors import InputError
from semvlp.io import read_json, read_text_lines, write_json
from semvlp.metrics import check_vqa_predictions, evaluate_vqa, normalize_vqa_answer
from semvlp.tasks.common import AnswerClassifier, QuestionAnsweringTask


@dataclass(frozen=True)
class Example:
    image_set: str
    img_id: str
    question: str
    answer_indices: np.ndarray  # int32, into the answer table
    scores: np.ndarray  # float32 soft scores of those answers


def answer_table(questions, min_count: int) -> AnswerTable:
    """Answers whose normalised most common annotator answer occurs at least `min_count` times."""
    counts = Counter(normalize_vqa_answer(q.multiple_choice_answer) for q in questions)
    return AnswerTable.from_counts(counts, min_count)


def read_image_list(path: Path) -> set[str]:
    """Image ids, one per line ('#' starts a comment), or LXMERT's minival.json (entries with `img_id`)."""
    if path.suffix == ".json":
        entries = read_json(path)
        if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("img_id"), str) for e in entries):
            raise InputError("expected a JSON list of entries with an `img_id` string (LXMERT's minival.json)", path)
        return {e["img_id"] for e in entries}
    images = {line.split("#")[0].strip() for line in read_text_lines(path)} - {""}
    if not images:
        raise InputError("names no image", path)
    return images


class VQA(QuestionAnsweringTask):
    name = "vqa"

    @cached_property
    def held_out(self) -> set[str]:
        path = self.settings.held_out_images
        return read_image_list(Path(path)) if path is not None else set()

    def scored_images(self, split: str) -> set[str] | None:
        """The images of `split` predicted and scored: of a training split, the held-out ones; else all (None)."""
        return self.held_out if split in self.settings.train_splits and self.held_out else None

    def questions(self, split: str) -> list[VQAQuestion]:
        """The split's questions on its scored images."""
        questions = load_vqa(self.files[f"{split}_questions"])
        images = self.scored_images(split)
        return questions if images is None else [q for q in questions if q.img_id in images]

    def training_examples(self):
        questions, counts, training_images = [], {}, set()
        for split in self.settings.train_splits:
            split_questions = load_vqa(self.files[f"{split}_questions"], self.files[f"{split}_annotations"])
            training_images.update(q.img_id for q in split_questions)
            kept = [q for q in split_questions if q.img_id not in self.held_out]
            counts[split] = len(kept)
            questions += kept
        if self.held_out - training_images:
            unknown = sorted(self.held_out - training_images)
            raise InputError(
                f"{len(unknown)} held-out images are in no training split ({', '.join(self.settings.train_splits)}), "
                f"e.g. {unknown[0]!r}; ids are image file stems such as COCO_val2014_000000000042",
                self.settings.held_out_images,
            )
        table = answer_table(questions, self.settings.min_answer_count)
        if len(table) == 0:
            raise InputError(
                f"no answer occurs {self.settings.min_answer_count} times (finetune.tasks.vqa.min_answer_count)",
                self.files[f"{self.settings.train_splits[0]}_annotations"],
            )
        # sparse soft targets, (answer indices, scores) per question: a dense vector each would take
        # 443,757 x 3,129 x 4 B ~ 5.5 GB on VQA v2 train
        examples = []
        for q in questions:
            scored = [(table.index[a], score) for a, score in vqa_targets(q.answers).items() if a in table.index and score > 0]
            if scored:  # questions with no answer in the table teach nothing
                indices, scores = zip(*scored)
                examples.append(Example("coco", q.img_id, q.question, np.array(indices, np.int32), np.array(scores, np.float32)))
        recorded = {"answers": list(table.answers), "questions_by_split": counts, "held_out_images": len(self.held_out)}
        if self.settings.vg_qa:
            vg_examples = self.vg_examples(table)
            examples += vg_examples
            recorded["vg_qa_examples"] = len(vg_examples)
        return examples, recorded

    def vg_examples(self, table: AnswerTable) -> list[Example]:
        """VG QAs whose answer is in the table, on VG images that are none of the evaluation images."""
        eval_images = HeldOutImages(coco=frozenset(q.img_id for split in self.settings.eval_splits for q in self.questions(split)))
        images = load_vg_images(self.files["vg_image_data"])
        examples = []
        for qa in load_vg_qa(self.files["vg_question_answers"], images, self.files["vg_image_data"]):
            answer = normalize_vqa_answer(qa.answer)
            if answer in table.index and not eval_images.holds("vg", qa.img_id, images[int(qa.img_id)]):
                examples.append(Example("vg", qa.img_id, qa.question, np.array([table.index[answer]], np.int32), np.ones(1, np.float32)))
        return examples

    def loss(self, model: AnswerClassifier, examples, step: int) -> torch.Tensor:
        logits = model(self.question_batch([(e.image_set, e.img_id, e.question) for e in examples]))
        targets = torch.zeros(logits.shape)  # [B, A], dense for this batch only
        for row, e in enumerate(examples):
            targets[row, torch.from_numpy(e.answer_indices).long()] = torch.from_numpy(e.scores)
        # summed over answers, as LXMERT does, so the loss does not shrink with the table size
        return nn.functional.binary_cross_entropy_with_logits(logits, targets.to(logits.device)) * logits.size(1)

    def predict(self, model, info, split, out_dir) -> Path:
        """predictions_{split}.json in the official results format (what EvalAI takes)."""
        questions = self.questions(split)
        answers = self.predict_answers(model, [("coco", q.img_id, q.question) for q in questions], info["answers"])
        path = Path(out_dir) / f"predictions_{split}.json"
        write_json(path, [{"question_id": q.question_id, "answer": a} for q, a in zip(questions, answers)])
        return path

    def evaluate(self, split, predictions_path, info):
        """Accuracy; for a test split (no annotations) the local check of the server file instead."""
        questions = self.files[f"{split}_questions"]
        if f"{split}_annotations" not in self.files:
            return check_vqa_predictions(questions, predictions_path)
        return evaluate_vqa(
            questions, self.files[f"{split}_annotations"], predictions_path,
            legacy_normalization=self.settings.legacy_normalization, images=self.scored_images(split),
        )


TASK = VQA
