"""Fine-tuning tasks: VQA v2, GQA, NLVR2, Flickr30K retrieval.

Each task is declared here, in `TASKS`: its name, the image set it reads, its settings dataclass (the
config's section of the task, task-specific keys included) and the files it reads. That is all the
workflow needs to plan a fine-tuning job, and it imports no torch, so planning stays fast. The task's
behaviour (its examples, model, loss, predictions, evaluation) is its `semvlp.tasks.common.Task`
subclass in `semvlp.tasks.<name>`, imported only when run (`TaskSpec.implementation`): a job's code,
and so its rerun fingerprint (semvlp.fingerprint), holds its own task only. `semvlp.tasks.runner` runs,
saves and loads task models.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from semvlp.data import layout


@dataclass
class TaskSettings:
    """The settings every task has. Every value comes from the validated config (the schema holds the
    defaults, so no field has one here)."""

    train_splits: list[str]  # trained on together
    eval_splits: list[str]
    mode: str  # single | two | both (outputs of the two modes averaged) | auto (see trained_mode)
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_ratio: float
    seed: int
    max_text_length: int
    checkpoint_every: int  # steps between partial checkpoints (a rerun resumes from the last)
    accumulation_steps: int  # micro-batches per optimiser step
    max_train_examples: int | None

    @classmethod
    def from_config(cls, section: dict[str, Any], *, seed: int, max_text_length: int) -> "TaskSettings":
        """From a task's section of the validated config."""
        keys = [f.name for f in fields(cls) if f.name not in ("seed", "max_text_length")]
        return cls(seed=seed, max_text_length=max_text_length, **{key: section[key] for key in keys})

    @classmethod
    def problems(cls, section: dict[str, Any]) -> list[tuple[str, str]]:
        """(key, problem) of what the schema cannot check in a task's section."""
        return [
            (f"eval_splits.{i}", f"'{split}' is also in train_splits, so it would be evaluated on what it trained on")
            for i, split in enumerate(section["eval_splits"])
            if split in section["train_splits"]
        ]

    @classmethod
    def extra_image_sets(cls, section: dict[str, Any]) -> list[str]:
        """Image sets some training examples come from besides the task's own (VQA: VG's with vg_qa)."""
        return []

    @classmethod
    def extra_files(cls, root: str | Path, section: dict[str, Any]) -> dict[str, Path]:
        """Files the task's own keys name, by name."""
        return {}


@dataclass
class VQASettings(TaskSettings):
    min_answer_count: int  # answers of the table: those the training questions give this often
    legacy_normalization: bool  # score as the official vqaEval.py did before 2021 (README)
    # images no training split may use; an eval split that is also a training split is evaluated on
    # these only (LXMERT's minival: 5,000 val2014 images, the rest of val2014 trained on)
    held_out_images: str | None
    vg_qa: bool  # Visual Genome's QAs on images outside the eval images as extra training questions

    @classmethod
    def problems(cls, section: dict[str, Any]) -> list[tuple[str, str]]:
        if section["held_out_images"] is not None:
            return []  # a training split among eval_splits is evaluated on the held-out images
        return [(key, f"{problem}; name held_out_images to score it on those only") for key, problem in super().problems(section)]

    @classmethod
    def extra_image_sets(cls, section: dict[str, Any]) -> list[str]:
        return ["vg"] if section["vg_qa"] else []

    @classmethod
    def extra_files(cls, root: str | Path, section: dict[str, Any]) -> dict[str, Path]:
        files = {}
        if section["vg_qa"]:
            files.update(vg_question_answers=layout.vg_question_answers(root), vg_image_data=layout.vg_image_data(root))
        if section["held_out_images"] is not None:
            files["held_out_images"] = Path(section["held_out_images"])
        return files


@dataclass
class RetrievalSettings(TaskSettings):
    negatives: int  # other images ranked against each caption's image
    caption_negatives: int  # captions of other images ranked against each caption for its image
    hard_negatives: bool
    candidate_pool: int  # random candidates scored per caption to mine hard negatives
    hard_negatives_from_epoch: int  # 0-based; earlier epochs use random negatives


@dataclass(frozen=True)
class TaskSpec:
    """A task as the workflow plans it."""

    name: str
    image_set: str  # the set its evaluation images come from (DEVELOPERS.md, "Image sets")
    settings: type[TaskSettings]
    data_source: str  # the semvlp.data.requirements.SOURCES entry: where its files come from
    split_files: Callable[[str | Path, str], dict[str, Path]]  # (root, split) -> {name: path}

    def files(self, root: str | Path, section: dict[str, Any]) -> dict[str, Path]:
        """The files the task reads, by name (`{split}_questions`, ...), for a config section."""
        splits = list(dict.fromkeys([*section["train_splits"], *section["eval_splits"]]))
        files = {name: path for split in splits for name, path in self.split_files(root, split).items()}
        return {**files, **self.settings.extra_files(root, section)}

    def image_sets(self, section: dict[str, Any]) -> list[str]:
        """The image sets the task reads features of, its own first."""
        return [self.image_set, *self.settings.extra_image_sets(section)]

    def implementation(self) -> type:
        """The task's `Task` subclass (imports its module)."""
        module = importlib.import_module(f"semvlp.tasks.{self.name}")
        return module.TASK


def _vqa_files(root, split: str) -> dict[str, Path]:
    files = {f"{split}_questions": layout.vqa_questions(root, split)}
    if split not in layout.VQA_TEST_SPLITS:  # EvalAI's test-dev and test-std come without annotations
        files[f"{split}_annotations"] = layout.vqa_annotations(root, split)
    return files


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("vqa", "coco", VQASettings, "vqa", _vqa_files),
        TaskSpec("gqa", "gqa", TaskSettings, "gqa", lambda root, split: {f"{split}_questions": layout.gqa_questions(root, split)}),
        TaskSpec("nlvr2", "nlvr2", TaskSettings, "nlvr2", lambda root, split: {f"{split}_data": layout.nlvr2_data(root, split)}),
        TaskSpec("retrieval", "flickr30k", RetrievalSettings, "flickr30k", lambda root, split: {"dataset": layout.flickr30k_dataset(root)}),
    )
}


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {tuple(TASKS)}")
    return TASKS[name]
