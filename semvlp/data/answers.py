"""QA answers: VQA soft scores and the answer table (answer string <-> classifier index)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from semvlp.errors import InputError
from semvlp.io import read_json, write_json
from semvlp.metrics import normalize_vqa_answer

# Soft score of an answer given by `count` of the 10 annotators (VQA v2 training targets, as in the
# bottom-up-attention / LXMERT code): full credit from 4 annotators on.
_SOFT_SCORES = (0.0, 0.3, 0.6, 0.9)


def vqa_soft_score(count: int) -> float:
    """Training target of an answer that `count` annotators gave: 0, 0.3, 0.6, 0.9, then 1.0 for >= 4."""
    if count < 0:
        raise ValueError(f"an annotator count cannot be negative, got {count}")
    return _SOFT_SCORES[count] if count < len(_SOFT_SCORES) else 1.0


def vqa_targets(answers: Sequence[str]) -> dict[str, float]:
    """Soft score per normalised answer of one question's raw annotator answers.

    Answers are normalised with the official evaluator's rules first, so "Two", "two." and "2" count as
    the same answer. Keys keep the order in which the answers first appear.
    """
    counts = Counter(normalize_vqa_answer(answer) for answer in answers)
    return {answer: vqa_soft_score(count) for answer, count in counts.items()}


@dataclass
class AnswerTable:
    """An ordered list of answers; position i is the classifier's output i.

    `index` maps each answer to its position (built from `answers`, never edited by hand).
    """

    answers: list[str]
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {}
        for position, answer in enumerate(self.answers):
            if answer in self.index:
                raise ValueError(f"answer {answer!r} appears twice in the answer table")
            self.index[answer] = position

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, answer: object) -> bool:
        return answer in self.index

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], min_count: int) -> AnswerTable:
        """Answers seen at least `min_count` times, most frequent first (ties alphabetically).

        The order depends only on the counts, never on iteration order, so equal data give equal tables.
        """
        if min_count < 1:
            raise ValueError(f"min_count must be at least 1, got {min_count}")
        kept = [answer for answer, count in counts.items() if count >= min_count]
        kept.sort(key=lambda answer: (-counts[answer], answer))
        return cls(kept)

    def save(self, path: str | Path) -> None:
        """Write `{"answers": [...]}` atomically."""
        write_json(path, {"answers": self.answers}, indent=1)

    @classmethod
    def load(cls, path: str | Path) -> AnswerTable:
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("answers"), list):
            raise InputError('expected a JSON object {"answers": [...]}', path)
        for position, answer in enumerate(data["answers"]):
            if not isinstance(answer, str):
                raise InputError(f"answer {position} is {answer!r}, expected a string", path)
        try:
            return cls(list(data["answers"]))
        except ValueError as err:
            raise InputError(str(err), path) from None
