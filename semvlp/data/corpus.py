"""The pre-training corpus: captions, region phrases and QA questions over images, merged into one
stream (as LXMERT).

Sources, the files they read under the data root (DEVELOPERS.md, "Data layout") and their image set:

* `coco_captions`: COCO captions (`coco/annotations/captions_{split}.json`), image set `coco`;
* `vqa`: VQA v2 questions with their most common normalised answer, image set `coco`;
* `gqa`: GQA balanced questions with their answer, image set `gqa`;
* `vg_captions`: Visual Genome region phrases (`vg/region_descriptions.json`), image set `vg`;
* `vg_qa`: Visual Genome QAs (`vg/question_answers.json`), image set `vg`. Both VG sources check
  every image against `vg/image_data.json`, which also gives the COCO and Flickr ids of VG images;
* `cc`: Conceptual Captions (`cc/Train_GCC-training.tsv`), image set `cc`;
* `sbu`: SBU Captions (`sbu/SBU_captioned_photo_dataset_{captions,urls}.txt`), image set `sbu`.

CC and SBU images are fetched by URL, and many URLs are dead. Their images are named by img2dataset's
default keys: under `{set}/images/` (in img2dataset's shard folders or flat), the file whose stem read as
an integer is N holds the image of line N (0-based) of the caption file. A line without an image is
dropped and counted.

Filters, each counted per source (`CorpusBuild.dropped`): a web caption without a fetched image; an
image that a downstream task evaluates on (`HeldOutImages`: LXMERT leaves the 5K minival images out
of its corpus, UNITER every downstream val/test image), matched through VG's COCO and Flickr ids too.

QA answers are normalised with the official VQA rules, and those seen at least `min_answer_count`
times form the answer table of the QA pre-training head. A QA record whose answer is not in the table
keeps its answer string; the training code gives it no QA target but still uses its sentence.
"""

from __future__ import annotations

import json
import os
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from semvlp.data import layout
from semvlp.data.answers import AnswerTable, vqa_targets
from semvlp.data.formats import (
    VGImage,
    load_cc_captions,
    load_coco_captions,
    load_flickr30k,
    load_gqa,
    load_sbu_captions,
    load_vg_images,
    load_vg_qa,
    load_vg_regions,
    load_vqa,
)
from semvlp.errors import InputError
from semvlp.io import atomic_path
from semvlp.metrics import normalize_vqa_answer

CORPUS_SOURCES = ("coco_captions", "vqa", "gqa", "vg_captions", "vg_qa", "cc", "sbu")
SOURCE_IMAGE_SET = {
    "coco_captions": "coco", "vqa": "coco", "gqa": "gqa", "vg_captions": "vg", "vg_qa": "vg", "cc": "cc", "sbu": "sbu",
}
IMAGE_SETS = ("coco", "gqa", "vg", "cc", "sbu")
# The downstream tasks whose evaluation images can also be corpus images (NLVR2's are not in any set).
HELD_OUT_TASKS = ("vqa", "gqa", "retrieval")


@dataclass(frozen=True)
class CorpusRecord:
    img_set: str  # one of IMAGE_SETS: which feature store holds the image
    img_id: str  # the image file's stem
    sentence: str  # a caption, a region phrase or a question
    answer: str | None  # normalised answer for QA sources, None for captions
    source: str  # one of CORPUS_SOURCES


def corpus_source_files(
    root: str | Path,
    sources: Sequence[str] = CORPUS_SOURCES,
    coco_splits: Sequence[str] = ("train2014",),
    gqa_splits: Sequence[str] = ("train",),
) -> dict[str, list[Path]]:
    """The files (and, for CC and SBU, the image folder, last) each source reads, in the official
    layout under `root`. VQA lists (questions, annotations) per split; the VG sources end with
    image_data.json."""
    unknown = [s for s in sources if s not in CORPUS_SOURCES]
    if unknown:
        raise ValueError(f"unknown corpus source {unknown[0]!r}, expected one of {', '.join(CORPUS_SOURCES)}")
    by_source = {
        "coco_captions": lambda: [layout.coco_captions(root, split) for split in coco_splits],
        "vqa": lambda: [
            path for split in coco_splits for path in (layout.vqa_questions(root, split), layout.vqa_annotations(root, split))
        ],
        "gqa": lambda: [layout.gqa_questions(root, split) for split in gqa_splits],
        "vg_captions": lambda: [layout.vg_region_descriptions(root), layout.vg_image_data(root)],
        "vg_qa": lambda: [layout.vg_question_answers(root), layout.vg_image_data(root)],
        "cc": lambda: [layout.cc_captions(root), layout.image_dir(root, "cc")],
        "sbu": lambda: [layout.sbu_captions(root), layout.sbu_urls(root), layout.image_dir(root, "sbu")],
    }
    return {source: by_source[source]() for source in sources}


@dataclass(frozen=True)
class HeldOutImages:
    """The images the downstream tasks evaluate on, which the corpus leaves out."""

    coco: frozenset[str] = frozenset()  # file stems, COCO_val2014_000000000042
    gqa: frozenset[str] = frozenset()  # GQA imageIds, which are Visual Genome image ids
    flickr30k: frozenset[str] = frozenset()  # file stems, which are Flickr photo ids

    @cached_property
    def _coco_numbers(self) -> set[int]:
        # VG's image_data.json gives COCO's numeric id; stems end with it, zero-padded to 12 digits
        return {int(stem[-12:]) for stem in self.coco if stem[-12:].isdigit()}

    def holds(self, img_set: str, img_id: str, vg_image: VGImage | None = None) -> bool:
        if img_set == "vg":
            return img_id in self.gqa or (
                vg_image is not None
                and (vg_image.coco_id in self._coco_numbers or str(vg_image.flickr_id) in self.flickr30k)
            )
        return img_id in getattr(self, img_set, ())

    def __len__(self) -> int:
        return len(self.coco) + len(self.gqa) + len(self.flickr30k)


def held_out_files(root: str | Path, eval_splits: Mapping[str, Sequence[str]]) -> dict[str, dict[str, Path]]:
    """The file of each evaluation split ({"vqa": ["val2014"], ...}) that names its images, by task
    and split; tasks whose images no corpus source uses (NLVR2) have none."""
    file_of = {"vqa": layout.vqa_questions, "gqa": layout.gqa_questions, "retrieval": lambda root, split: layout.flickr30k_dataset(root)}
    return {task: {split: file_of[task](root, split) for split in splits} for task, splits in eval_splits.items() if task in file_of}


def held_out_images(files: Mapping[str, Mapping[str, str | Path]]) -> HeldOutImages:
    """The images of the evaluation splits in `files` (`held_out_files`)."""
    coco: set[str] = set()
    gqa: set[str] = set()
    flickr: set[str] = set()
    for task, by_split in files.items():
        for split, path in by_split.items():
            if task == "vqa":
                coco.update(q.img_id for q in load_vqa(path))
            elif task == "gqa":
                gqa.update(q.img_id for q in load_gqa(path))
            elif task == "retrieval":
                flickr.update(image.img_id for image in load_flickr30k(path, split))
            else:
                raise ValueError(f"no held-out images for task {task!r}; expected one of {HELD_OUT_TASKS}")
    return HeldOutImages(frozenset(coco), frozenset(gqa), frozenset(flickr))


@dataclass
class CorpusBuild:
    """A merged corpus, its QA answer table, and what each source gave and lost to the filters."""

    records: list[CorpusRecord]
    table: AnswerTable
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> {"held_out": n, "no_image": n}

    def by_source(self) -> dict[str, int]:
        counts = Counter(record.source for record in self.records)
        return {source: counts.get(source, 0) for source in self.dropped}

    def summary(self) -> dict:
        return {
            "records": len(self.records), "qa_records": sum(r.answer is not None for r in self.records),
            "answers": len(self.table), "by_source": self.by_source(), "dropped": self.dropped,
        }


def build_corpus(
    root: str | Path,
    sources: Sequence[str] = CORPUS_SOURCES,
    *,
    min_answer_count: int,
    coco_splits: Sequence[str] = ("train2014",),
    gqa_splits: Sequence[str] = ("train",),
    held_out: Mapping[str, Sequence[str]] | None = None,
) -> CorpusBuild:
    """Merge the sources into one record stream (sources in the order given, files in file order),
    leaving out the images of the `held_out` evaluation splits ({"vqa": ["val2014"], ...}), and build
    the table of QA answers seen at least `min_answer_count` times.

    Every source file is checked to exist before any is read, so a missing file fails fast.
    """
    return merge_sources(
        corpus_source_files(root, sources, coco_splits, gqa_splits), min_answer_count=min_answer_count,
        held_out=held_out_images(held_out_files(root, held_out or {})),
    )


def merge_sources(
    files: Mapping[str, Sequence[str | Path]], *, min_answer_count: int, held_out: HeldOutImages = HeldOutImages()
) -> CorpusBuild:
    """`build_corpus` on explicit files, as `corpus_source_files` lists them (the workflow's rule
    declares those files as its inputs and passes them here)."""
    files = {source: [Path(p) for p in paths] for source, paths in files.items()}
    for source, paths in files.items():
        for path in paths:
            if path.name == "images" and source in ("cc", "sbu"):
                if not path.is_dir():
                    raise InputError("image folder not found (the images of a pre-training corpus source)", path)
            elif not path.is_file():
                raise InputError("file not found (a pre-training corpus source)", path)

    records: list[CorpusRecord] = []
    dropped: dict[str, dict[str, int]] = {}
    for source, paths in files.items():
        kept, lost = _read_source(source, paths, held_out)
        records += kept
        dropped[source] = lost
    answer_counts = Counter(r.answer for r in records if r.answer is not None)
    return CorpusBuild(records, AnswerTable.from_counts(answer_counts, min_answer_count), dropped)


def _read_source(source: str, paths: list[Path], held_out: HeldOutImages) -> tuple[list[CorpusRecord], dict[str, int]]:
    """One source's records that pass the filters, and how many each filter dropped."""
    img_set = SOURCE_IMAGE_SET[source]
    lost = Counter({"held_out": 0, "no_image": 0})
    records = []

    def add(img_id: str, sentence: str, answer: str | None, vg_image: VGImage | None = None) -> None:
        if held_out.holds(img_set, img_id, vg_image):
            lost["held_out"] += 1
        else:
            records.append(CorpusRecord(img_set, img_id, sentence, answer, source))

    if source == "coco_captions":
        for path in paths:
            for caption in load_coco_captions(path):
                add(caption.img_id, caption.caption, None)
    elif source == "vqa":
        for questions_path, annotations_path in zip(paths[0::2], paths[1::2]):
            for q in load_vqa(questions_path, annotations_path):
                add(q.img_id, q.question, _top_answer(q.answers))
    elif source == "gqa":
        for path in paths:
            for q in load_gqa(path):
                if q.answer is None:
                    raise InputError(f"question {q.question_id!r} has no answer; pre-training needs answers", path)
                add(q.img_id, q.question, normalize_vqa_answer(q.answer))
    elif source in ("vg_captions", "vg_qa"):
        annotations_path, images_path = paths
        images = load_vg_images(images_path)
        if source == "vg_captions":
            for region in load_vg_regions(annotations_path, images, images_path):
                add(region.img_id, region.phrase, None, images[int(region.img_id)])
        else:
            for qa in load_vg_qa(annotations_path, images, images_path):
                add(qa.img_id, qa.question, normalize_vqa_answer(qa.answer), images[int(qa.img_id)])
    else:
        *caption_files, images_dir = paths
        captions = load_cc_captions(*caption_files) if source == "cc" else load_sbu_captions(*caption_files)
        keys = web_image_keys(images_dir)
        for caption in captions:
            if caption.row in keys:
                add(keys[caption.row], caption.caption, None)
            else:
                lost["no_image"] += 1
    return records, dict(lost)


def web_image_keys(images_dir: str | Path) -> dict[int, str]:
    """Caption-file line -> image stem for images named by img2dataset's default keys (the stem,
    read as an integer, is the 0-based line; shard folders or flat). Other files are not images of it."""
    images_dir = Path(images_dir)
    paths: dict[int, Path] = {}
    for folder, _, names in os.walk(images_dir):
        for name in names:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() not in layout.IMAGE_SUFFIXES or not stem.isdigit():
                continue
            if int(stem) in paths:
                raise InputError(f"holds two images of line {int(stem)}: {paths[int(stem)]} and {Path(folder) / name}", images_dir)
            paths[int(stem)] = Path(folder) / name
    return {line: path.stem for line, path in paths.items()}


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
