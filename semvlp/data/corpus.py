"""The pre-training corpus: captions and QA questions over images, merged into one stream (as LXMERT).

Sources and the image set whose features they use:

* `coco_captions`: COCO captions (`{root}/coco/annotations/captions_{split}.json`), image set `coco`;
* `vqa`: VQA v2 questions with their most common normalised answer, image set `coco`;
* `gqa`: GQA balanced questions with their answer, image set `gqa`.

QA answers are normalised with the official VQA rules, and those seen at least `min_answer_count`
times form the answer table of the QA pre-training head. A QA record whose answer is not in the table
keeps its answer string; the training code gives it no QA target but still uses its sentence.
"""

from __future__ import annotations

import json
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from semvlp.data import layout
from semvlp.data.answers import AnswerTable, vqa_targets
from semvlp.data.formats import load_coco_captions, load_gqa, load_vqa
from semvlp.errors import InputError
from semvlp.io import atomic_path
from semvlp.metrics import normalize_vqa_answer

CORPUS_SOURCES = ("coco_captions", "vqa", "gqa")
SOURCE_IMAGE_SET = {"coco_captions": "coco", "vqa": "coco", "gqa": "gqa"}
IMAGE_SETS = ("coco", "gqa")


@dataclass(frozen=True)
class CorpusRecord:
    img_set: str  # coco | gqa: which feature file holds the image
    img_id: str  # the image file's stem
    sentence: str  # a caption or a question
    answer: str | None  # normalised answer for QA sources, None for captions
    source: str  # one of CORPUS_SOURCES


def corpus_source_files(
    root: str | Path,
    sources: Sequence[str] = CORPUS_SOURCES,
    coco_splits: Sequence[str] = ("train2014",),
    gqa_splits: Sequence[str] = ("train",),
) -> dict[str, list[Path]]:
    """The files each source reads, in the official layout under `root` (DEVELOPERS.md)."""
    unknown = [s for s in sources if s not in CORPUS_SOURCES]
    if unknown:
        raise ValueError(f"unknown corpus source {unknown[0]!r}, expected one of {', '.join(CORPUS_SOURCES)}")
    files: dict[str, list[Path]] = {}
    for source in sources:
        if source == "coco_captions":
            files[source] = [layout.coco_captions(root, split) for split in coco_splits]
        elif source == "vqa":
            files[source] = [
                path
                for split in coco_splits
                for path in (layout.vqa_questions(root, split), layout.vqa_annotations(root, split))
            ]
        else:
            files[source] = [layout.gqa_questions(root, split) for split in gqa_splits]
    return files


def build_corpus(
    root: str | Path,
    sources: Sequence[str] = CORPUS_SOURCES,
    *,
    min_answer_count: int,
    coco_splits: Sequence[str] = ("train2014",),
    gqa_splits: Sequence[str] = ("train",),
) -> tuple[list[CorpusRecord], AnswerTable]:
    """Merge the sources into one record stream (sources in the order given, files in file order)
    and build the table of QA answers seen at least `min_answer_count` times.

    Every source file is checked to exist before any is read, so a missing file fails fast.
    """
    return merge_sources(corpus_source_files(root, sources, coco_splits, gqa_splits), min_answer_count=min_answer_count)


def merge_sources(files: Mapping[str, Sequence[str | Path]], *, min_answer_count: int) -> tuple[list[CorpusRecord], AnswerTable]:
    """`build_corpus` on explicit files, as `corpus_source_files` lists them (the workflow's rule
    declares those files as its inputs and passes them here)."""
    files = {source: [Path(p) for p in paths] for source, paths in files.items()}
    for paths in files.values():
        for path in paths:
            if not path.is_file():
                raise InputError("file not found (a pre-training corpus source)", path)

    records: list[CorpusRecord] = []
    for source, paths in files.items():
        if source == "coco_captions":
            for path in paths:
                records += [CorpusRecord("coco", c.img_id, c.caption, None, source) for c in load_coco_captions(path)]
        elif source == "vqa":
            # `corpus_source_files` lists VQA files as (questions, annotations) per split.
            for questions_path, annotations_path in zip(paths[0::2], paths[1::2]):
                for q in load_vqa(questions_path, annotations_path):
                    records.append(CorpusRecord("coco", q.img_id, q.question, _top_answer(q.answers), source))
        else:
            for path in paths:
                for q in load_gqa(path):
                    if q.answer is None:
                        raise InputError(f"question {q.question_id!r} has no answer; pre-training needs answers", path)
                    records.append(CorpusRecord("gqa", q.img_id, q.question, normalize_vqa_answer(q.answer), source))

    answer_counts = Counter(r.answer for r in records if r.answer is not None)
    return records, AnswerTable.from_counts(answer_counts, min_answer_count)


def _top_answer(answers: list[str]) -> str:
    """The answer with the highest soft score (first given wins ties)."""
    targets = vqa_targets(answers)
    return max(targets, key=targets.__getitem__)


def write_corpus(records: Sequence[CorpusRecord], table: AnswerTable, corpus_path: str | Path, answers_path: str | Path) -> None:
    """Write the records as jsonl and the answer table as JSON, each atomically."""
    with atomic_path(corpus_path) as tmp:
        with open(tmp, "w", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps(asdict(record)) + "\n")
    table.save(answers_path)


_RECORD_FIELDS = {f.name for f in fields(CorpusRecord)}


class Corpus(Sequence[CorpusRecord]):
    """The records of a corpus file as columns: a record is built only when it is indexed.

    Why: LXMERT's 9.18M sentences as Python objects take several GB, and every DataLoader worker forked
    from the training process would copy their pages as reference counts change. Here they are a few
    numpy arrays (the sentences' UTF-8 bytes and offsets, an image, answer and source index per record)
    plus the lists of distinct images and answers.
    """

    def __init__(self, text: np.ndarray, starts: np.ndarray, lengths: np.ndarray, image: np.ndarray, answer: np.ndarray,
                 source: np.ndarray, image_keys: list[tuple[str, str]], answers: list[str]):
        self.text = text  # (total bytes,) uint8: the sentences' UTF-8, back to back
        self.starts, self.lengths = starts, lengths  # (N,) int64, int32: each record's sentence in `text`
        self.image, self.answer, self.source = image, answer, source  # (N,) int32, int32 (-1: none), int8
        self.image_keys, self.answers = image_keys, answers  # distinct (img_set, img_id), distinct answers

    @classmethod
    def from_records(cls, records: Sequence[CorpusRecord]) -> Corpus:
        columns = _Columns()
        for record in records:
            columns.add(record.img_set, record.img_id, record.sentence, record.answer, record.source)
        return columns.corpus()

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, index: int) -> CorpusRecord:
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        index %= len(self)
        img_set, img_id = self.image_keys[self.image[index]]
        answer, start = self.answer[index], self.starts[index]
        return CorpusRecord(
            img_set, img_id, self.text[start : start + self.lengths[index]].tobytes().decode("utf-8"),
            None if answer < 0 else self.answers[answer], CORPUS_SOURCES[self.source[index]],
        )

    def of_sources(self, sources: Sequence[str]) -> Corpus:
        """The records of these sources (sharing this corpus's text)."""
        rows = np.flatnonzero(np.isin(self.source, [CORPUS_SOURCES.index(s) for s in sources]))
        return Corpus(self.text, self.starts[rows], self.lengths[rows], self.image[rows], self.answer[rows], self.source[rows],
                      self.image_keys, self.answers)

    def images(self) -> list[tuple[str, str]]:
        """The distinct images the records use, in order of first use."""
        return [self.image_keys[i] for i in self.image_indices()]

    def image_indices(self) -> np.ndarray:
        """Indices into `image_keys` of the distinct images the records use, in order of first use."""
        first_use = np.full(len(self.image_keys), len(self), np.int64)
        np.minimum.at(first_use, self.image, np.arange(len(self)))
        used = np.flatnonzero(first_use < len(self))
        return used[np.argsort(first_use[used], kind="stable")]

    def sentences(self) -> Iterator[str]:
        for start, length in zip(self.starts.tolist(), self.lengths.tolist()):
            yield self.text[start : start + length].tobytes().decode("utf-8")


class _Columns:
    """A corpus's columns as they grow, record by record."""

    def __init__(self):
        self.text, self.starts, self.lengths = bytearray(), array("q"), array("i")
        self.image, self.answer, self.source = array("i"), array("i"), array("b")
        self.image_index: dict[tuple[str, str], int] = {}
        self.answer_index: dict[str, int] = {}

    def add(self, img_set: str, img_id: str, sentence: str, answer: str | None, source: str) -> None:
        encoded = sentence.encode("utf-8")
        self.starts.append(len(self.text))
        self.lengths.append(len(encoded))
        self.text += encoded
        self.image.append(self.image_index.setdefault((img_set, img_id), len(self.image_index)))
        self.answer.append(-1 if answer is None else self.answer_index.setdefault(answer, len(self.answer_index)))
        self.source.append(CORPUS_SOURCES.index(source))

    def corpus(self) -> Corpus:
        return Corpus(
            np.frombuffer(self.text, np.uint8), np.frombuffer(self.starts, np.int64), np.frombuffer(self.lengths, np.int32),
            np.frombuffer(self.image, np.int32), np.frombuffer(self.answer, np.int32), np.frombuffer(self.source, np.int8),
            list(self.image_index), list(self.answer_index),
        )


def read_corpus(path: str | Path) -> Corpus:
    """Records written by `write_corpus`, checked line by line."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path)
    columns = _Columns()
    with open(path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            where = f"line {line_number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{where} is not valid JSON ({err})", path) from None
            if not isinstance(entry, dict) or set(entry) != _RECORD_FIELDS:
                raise InputError(f"{where} must be an object with exactly the fields {sorted(_RECORD_FIELDS)}", path)
            if entry["img_set"] not in IMAGE_SETS:
                raise InputError(f"{where} has img_set {entry['img_set']!r}, expected one of {', '.join(IMAGE_SETS)}", path)
            if entry["source"] not in CORPUS_SOURCES:
                raise InputError(f"{where} has source {entry['source']!r}, expected one of {', '.join(CORPUS_SOURCES)}", path)
            for key in ("img_id", "sentence"):
                if not isinstance(entry[key], str) or not entry[key]:
                    raise InputError(f"{where} field {key!r} must be a non-empty string", path)
            if entry["answer"] is not None and not isinstance(entry["answer"], str):
                raise InputError(f"{where} field 'answer' must be a string or null", path)
            columns.add(entry["img_set"], entry["img_id"], entry["sentence"], entry["answer"], entry["source"])
    corpus = columns.corpus()
    if not len(corpus):
        raise InputError("holds no records", path)
    return corpus
