"""Loaders of the public data formats: COCO, VQA v2, GQA, NLVR2, Flickr30K (Karpathy split), Visual
Genome, Conceptual Captions and SBU Captions.

Every loader returns records whose `img_id` is the image file's stem (DEVELOPERS.md, "Image ids"), so
a record can be looked up in the region-feature store directly. Malformed input raises `InputError`
naming the file and the first offending entry; JSON list entries are counted from 0, jsonl lines from 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semvlp.errors import InputError
from semvlp.io import read_json, read_text_lines

# Karpathy split names (`restval` exists in the COCO version of the file).
KARPATHY_SPLITS = ("train", "restval", "val", "test")
_NLVR2_LABELS = {"True": True, "False": False}


# ---------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CocoObject:
    """One instance annotation."""

    annotation_id: int
    box: tuple[float, float, float, float]  # (x1, y1, x2, y2) in pixels
    category_id: int
    attribute_ids: tuple[int, ...]  # empty when the file carries no attributes


@dataclass(frozen=True)
class CocoImage:
    img_id: str  # file stem, e.g. COCO_val2014_000000000042
    image_id: int  # COCO's numeric id
    file_name: str
    width: int
    height: int
    objects: tuple[CocoObject, ...]


@dataclass(frozen=True)
class CocoInstances:
    images: list[CocoImage]  # in file order
    categories: dict[int, str]  # category id -> name
    attributes: dict[int, str]  # attribute id -> name; empty when the file has no "attributes"


@dataclass(frozen=True)
class Caption:
    img_id: str
    caption: str
    caption_id: int


@dataclass(frozen=True)
class VQAQuestion:
    question_id: int
    img_id: str
    question: str
    answers: list[str]  # the annotators' raw answers (10 in VQA v2); empty without annotations
    answer_type: str | None  # yes/no | number | other; None without annotations
    question_type: str | None
    multiple_choice_answer: str | None


@dataclass(frozen=True)
class GQAQuestion:
    question_id: str
    img_id: str
    question: str
    answer: str | None  # None in the unlabelled test/submission files


@dataclass(frozen=True)
class NLVR2Example:
    identifier: str  # split-set-pair-sentence
    sentence: str
    label: bool | None  # None when the file carries no label
    left_img_id: str  # split-set-pair-img0
    right_img_id: str  # split-set-pair-img1


@dataclass(frozen=True)
class FlickrImage:
    img_id: str
    captions: list[str]


# ---------------------------------------------------------------------------------------------------
# Checking helpers
# ---------------------------------------------------------------------------------------------------


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object", bool: "a boolean"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _is_instance(value: Any, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False  # JSON true/false must not pass for a number
    if float in kinds and isinstance(value, int):
        return True
    return isinstance(value, kinds)


def _field(entry: Any, key: str, kind: type | tuple[type, ...], path: Path, where: str) -> Any:
    """entry[key], checked to exist and to have the expected JSON type."""
    if not isinstance(entry, dict):
        raise InputError(f"{where} is {type(entry).__name__}, expected a JSON object", path)
    if key not in entry:
        raise InputError(f"{where} has no field {key!r}", path)
    value = entry[key]
    if not _is_instance(value, kind):
        raise InputError(f"{where} field {key!r} is {value!r}, expected {_type_name(kind)}", path)
    return value


def _top_list(data: Any, key: str, path: Path) -> list:
    if not isinstance(data, dict):
        raise InputError(f"expected a JSON object at the top level, got {type(data).__name__}", path)
    return _field(data, key, list, path, "the file")


def _no_duplicates(ids: list, path: Path, what: str) -> None:
    seen: set = set()
    for position, value in enumerate(ids):
        if value in seen:
            raise InputError(f"{what} {position} repeats id {value!r}", path)
        seen.add(value)


def _file_name_by_image_id(images: list, path: Path) -> dict[int, str]:
    file_names: dict[int, str] = {}
    for position, image in enumerate(images):
        where = f"image entry {position}"
        image_id = _field(image, "id", int, path, where)
        if image_id in file_names:
            raise InputError(f"{where} repeats id {image_id}", path)
        file_names[image_id] = _field(image, "file_name", str, path, where)
    return file_names


# ---------------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------------


def _id_names(entries: list, path: Path, what: str) -> dict[int, str]:
    names: dict[int, str] = {}
    for position, entry in enumerate(entries):
        where = f"{what} entry {position}"
        entry_id = _field(entry, "id", int, path, where)
        if entry_id in names:
            raise InputError(f"{where} repeats id {entry_id}", path)
        names[entry_id] = _field(entry, "name", str, path, where)
    return names


def load_coco_instances(path: str | Path) -> CocoInstances:
    """`instances_{split}.json`: images with their boxes (converted from [x, y, w, h] to xyxy pixels).

    `attributes` / `attribute_ids` (a Visual-Genome-style extension) are optional.
    """
    path = Path(path)
    data = read_json(path)
    images = _top_list(data, "images", path)
    annotations = _top_list(data, "annotations", path)
    categories = _id_names(_top_list(data, "categories", path), path, "category")
    attributes = _id_names(_top_list(data, "attributes", path), path, "attribute") if "attributes" in data else {}

    _file_name_by_image_id(images, path)  # checks ids and file names
    for position, image in enumerate(images):
        for key in ("width", "height"):
            if _field(image, key, int, path, f"image entry {position}") <= 0:
                raise InputError(f"image entry {position} has {key} {image[key]}, expected a positive integer", path)
    objects_by_image: dict[int, list[CocoObject]] = {image["id"]: [] for image in images}

    annotation_ids = []
    for position, annotation in enumerate(annotations):
        where = f"annotation entry {position}"
        annotation_ids.append(_field(annotation, "id", int, path, where))
        image_id = _field(annotation, "image_id", int, path, where)
        if image_id not in objects_by_image:
            raise InputError(f"{where} names image_id {image_id}, which is not in 'images'", path)
        category_id = _field(annotation, "category_id", int, path, where)
        if category_id not in categories:
            raise InputError(f"{where} names category_id {category_id}, which is not in 'categories'", path)
        bbox = _field(annotation, "bbox", list, path, where)
        if len(bbox) != 4 or not all(_is_instance(v, float) for v in bbox) or bbox[2] < 0 or bbox[3] < 0:
            raise InputError(f"{where} has bbox {bbox!r}, expected [x, y, width, height] with width, height >= 0", path)
        attribute_ids: list[int] = []
        if "attribute_ids" in annotation:
            attribute_ids = _field(annotation, "attribute_ids", list, path, where)
            for attribute_id in attribute_ids:
                if not _is_instance(attribute_id, int) or attribute_id not in attributes:
                    raise InputError(f"{where} names attribute id {attribute_id!r}, which is not in 'attributes'", path)
        x, y, width, height = (float(v) for v in bbox)
        objects_by_image[image_id].append(
            CocoObject(
                annotation_id=annotation["id"],
                box=(x, y, x + width, y + height),
                category_id=category_id,
                attribute_ids=tuple(attribute_ids),
            )
        )
    _no_duplicates(annotation_ids, path, "annotation entry")

    return CocoInstances(
        images=[
            CocoImage(
                img_id=Path(image["file_name"]).stem,
                image_id=image["id"],
                file_name=image["file_name"],
                width=image["width"],
                height=image["height"],
                objects=tuple(objects_by_image[image["id"]]),
            )
            for image in images
        ],
        categories=categories,
        attributes=attributes,
    )


def load_coco_captions(path: str | Path) -> list[Caption]:
    """`captions_{split}.json`: one record per caption, in annotation order."""
    path = Path(path)
    data = read_json(path)
    file_names = _file_name_by_image_id(_top_list(data, "images", path), path)
    captions = []
    for position, annotation in enumerate(_top_list(data, "annotations", path)):
        where = f"annotation entry {position}"
        image_id = _field(annotation, "image_id", int, path, where)
        if image_id not in file_names:
            raise InputError(f"{where} names image_id {image_id}, which is not in 'images'", path)
        captions.append(
            Caption(
                img_id=Path(file_names[image_id]).stem,
                caption=_field(annotation, "caption", str, path, where),
                caption_id=_field(annotation, "id", int, path, where),
            )
        )
    _no_duplicates([c.caption_id for c in captions], path, "annotation entry")
    return captions


# ---------------------------------------------------------------------------------------------------
# VQA v2
# ---------------------------------------------------------------------------------------------------


def load_vqa(questions_path: str | Path, annotations_path: str | Path | None = None) -> list[VQAQuestion]:
    """Official VQA v2 questions (+ annotations, when given), in question-file order.

    The image id comes from the questions' `data_subtype`: `COCO_{data_subtype}_{image_id:012d}`
    (test-dev2015's images are test2015's).
    With annotations, every question must have exactly one annotation and vice versa.
    """
    questions_path = Path(questions_path)
    data = read_json(questions_path)
    questions = _top_list(data, "questions", questions_path)
    data_subtype = _field(data, "data_subtype", str, questions_path, "the file")

    parsed: list[tuple[int, int, str]] = []  # (question_id, image_id, question)
    for position, question in enumerate(questions):
        where = f"question entry {position}"
        parsed.append(
            (
                _field(question, "question_id", int, questions_path, where),
                _field(question, "image_id", int, questions_path, where),
                _field(question, "question", str, questions_path, where),
            )
        )
    _no_duplicates([question_id for question_id, _, _ in parsed], questions_path, "question entry")

    image_split = "test2015" if data_subtype == "test-dev2015" else data_subtype  # test-dev is part of test
    annotation_by_question: dict[int, dict] = {}
    if annotations_path is not None:
        annotation_by_question = _load_vqa_annotations(Path(annotations_path), data_subtype, questions_path, parsed)

    records = []
    for question_id, image_id, question in parsed:
        annotation = annotation_by_question.get(question_id)
        records.append(
            VQAQuestion(
                question_id=question_id,
                img_id=f"COCO_{image_split}_{image_id:012d}",
                question=question,
                answers=[a["answer"] for a in annotation["answers"]] if annotation else [],
                answer_type=annotation["answer_type"] if annotation else None,
                question_type=annotation["question_type"] if annotation else None,
                multiple_choice_answer=annotation["multiple_choice_answer"] if annotation else None,
            )
        )
    return records


def _load_vqa_annotations(
    path: Path, data_subtype: str, questions_path: Path, questions: list[tuple[int, int, str]]
) -> dict[int, dict]:
    """Checked annotations by question id; they must match the questions one to one."""
    data = read_json(path)
    annotations = _top_list(data, "annotations", path)
    if "data_subtype" in data and data["data_subtype"] != data_subtype:
        raise InputError(
            f"data_subtype {data['data_subtype']!r} differs from {data_subtype!r} in {questions_path.name}", path
        )
    image_by_question = {question_id: image_id for question_id, image_id, _ in questions}
    by_question: dict[int, dict] = {}
    for position, annotation in enumerate(annotations):
        where = f"annotation entry {position}"
        question_id = _field(annotation, "question_id", int, path, where)
        if question_id not in image_by_question:
            raise InputError(f"{where} names question_id {question_id}, which is not in {questions_path.name}", path)
        if question_id in by_question:
            raise InputError(f"{where} repeats question_id {question_id}", path)
        image_id = _field(annotation, "image_id", int, path, where)
        if image_id != image_by_question[question_id]:
            raise InputError(
                f"{where} has image_id {image_id} but question {question_id} is about image "
                f"{image_by_question[question_id]} in {questions_path.name}",
                path,
            )
        for key in ("answer_type", "question_type", "multiple_choice_answer"):
            _field(annotation, key, str, path, where)
        answers = _field(annotation, "answers", list, path, where)
        if not answers:
            raise InputError(f"{where} has an empty answers list", path)
        for number, answer in enumerate(answers):
            _field(answer, "answer", str, path, f"{where} answer {number}")
        by_question[question_id] = annotation
    for question_id, _, _ in questions:
        if question_id not in by_question:
            raise InputError(f"question {question_id} of {questions_path.name} has no annotation", path)
    return by_question


# ---------------------------------------------------------------------------------------------------
# GQA
# ---------------------------------------------------------------------------------------------------


def load_gqa(path: str | Path) -> list[GQAQuestion]:
    """`{split}_balanced_questions.json` (question id -> question), in file order.

    `answer` may be missing (the unlabelled test files); then it is None.
    """
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise InputError(f"expected a JSON object mapping question ids to questions, got {type(data).__name__}", path)
    records = []
    for question_id, entry in data.items():
        where = f"question {question_id!r}"
        answer = _field(entry, "answer", str, path, where) if isinstance(entry, dict) and "answer" in entry else None
        records.append(
            GQAQuestion(
                question_id=question_id,
                img_id=_field(entry, "imageId", str, path, where),
                question=_field(entry, "question", str, path, where),
                answer=answer,
            )
        )
    return records


# ---------------------------------------------------------------------------------------------------
# NLVR2
# ---------------------------------------------------------------------------------------------------


def load_nlvr2(path: str | Path) -> list[NLVR2Example]:
    """NLVR2 jsonl (one example per line), in file order; blank lines are skipped.

    Image ids follow the image file names: identifier `train-10171-0-0` -> `train-10171-0-img0`/`-img1`.
    A missing `label` gives None; any label other than "True"/"False" is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path)
    examples = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"line {line_number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{where} is not valid JSON ({err})", path) from None
            identifier = _field(entry, "identifier", str, path, where)
            fields = identifier.split("-")
            if len(fields) != 4 or not all(fields):
                raise InputError(f"{where} has identifier {identifier!r}, expected split-set-pair-sentence", path)
            if identifier in seen:
                raise InputError(f"{where} repeats identifier {identifier!r}", path)
            seen.add(identifier)
            label = None
            if "label" in entry:
                raw_label = entry["label"]
                if raw_label not in _NLVR2_LABELS:
                    raise InputError(f'{where} has label {raw_label!r}, expected "True" or "False"', path)
                label = _NLVR2_LABELS[raw_label]
            pair = "-".join(fields[:3])
            examples.append(
                NLVR2Example(
                    identifier=identifier,
                    sentence=_field(entry, "sentence", str, path, where),
                    label=label,
                    left_img_id=f"{pair}-img0",
                    right_img_id=f"{pair}-img1",
                )
            )
    return examples


# ---------------------------------------------------------------------------------------------------
# Flickr30K (Karpathy split)
# ---------------------------------------------------------------------------------------------------


def load_flickr30k(path: str | Path, split: str) -> list[FlickrImage]:
    """The images of one split of `dataset_flickr30k.json`, in file order, with their raw captions."""
    path = Path(path)
    if split not in KARPATHY_SPLITS:
        raise InputError(f"unknown split {split!r}, expected one of {', '.join(KARPATHY_SPLITS)}", path)
    images = _top_list(read_json(path), "images", path)
    selected = []
    for position, image in enumerate(images):
        where = f"image entry {position}"
        image_split = _field(image, "split", str, path, where)
        if image_split not in KARPATHY_SPLITS:
            raise InputError(f"{where} has unknown split {image_split!r}", path)
        filename = _field(image, "filename", str, path, where)
        sentences = _field(image, "sentences", list, path, where)
        captions = [_field(s, "raw", str, path, f"{where} sentence {n}") for n, s in enumerate(sentences)]
        if image_split != split:
            continue
        if not captions:
            raise InputError(f"{where} has no sentences", path)
        selected.append(FlickrImage(img_id=Path(filename).stem, captions=captions))
    if not selected:
        raise InputError(f"has no images in split {split!r}", path)
    return selected


# ---------------------------------------------------------------------------------------------------
# Visual Genome
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VGImage:
    image_id: int
    coco_id: int | None  # the same picture's COCO id (about 51K of VG's 108K images)
    flickr_id: int | None  # the Flickr photo id, which Flickr30K file names carry


@dataclass(frozen=True)
class VGRegion:
    img_id: str  # str(image_id): VG's image files are <image_id>.jpg
    region_id: int
    phrase: str
    box: tuple[float, float, float, float]  # (x1, y1, x2, y2) in pixels


@dataclass(frozen=True)
class VGQuestion:
    img_id: str
    qa_id: int
    question: str
    answer: str  # as written, e.g. "Green." (callers normalise it)


def load_vg_images(path: str | Path) -> dict[int, VGImage]:
    """`image_data.json`: image id -> its COCO and Flickr ids."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise InputError(f"expected a JSON list of images, got {type(data).__name__}", path)
    images: dict[int, VGImage] = {}
    for position, entry in enumerate(data):
        where = f"image entry {position}"
        # v1.2 names the field "id", v1.4 "image_id"
        key = "image_id" if isinstance(entry, dict) and "image_id" in entry else "id"
        image_id = _field(entry, key, int, path, where)
        if image_id in images:
            raise InputError(f"{where} repeats image id {image_id}", path)
        coco_id, flickr_id = (entry.get(name) for name in ("coco_id", "flickr_id"))
        for name, value in (("coco_id", coco_id), ("flickr_id", flickr_id)):
            if value is not None and not _is_instance(value, int):
                raise InputError(f"{where} field {name!r} is {value!r}, expected an integer or null", path)
        images[image_id] = VGImage(image_id, coco_id, flickr_id)
    return images


def _vg_entries(path: Path, items_key: str, images: dict[int, VGImage], images_path: Path):
    """(where, image id, item) for every item of every image entry of a VG per-image file, each
    image checked to be in image_data.json."""
    data = read_json(path)
    if not isinstance(data, list):
        raise InputError(f"expected a JSON list with one entry per image, got {type(data).__name__}", path)
    for position, entry in enumerate(data):
        where = f"image entry {position}"
        image_id = _field(entry, "id", int, path, where)
        if image_id not in images:
            raise InputError(f"{where} names image id {image_id}, which is not in {images_path}", path)
        for number, item in enumerate(_field(entry, items_key, list, path, where)):
            yield f"{where} {items_key[:-1]} {number}", image_id, item


def load_vg_regions(path: str | Path, images: dict[int, VGImage], images_path: str | Path) -> list[VGRegion]:
    """`region_descriptions.json`: every region's phrase and box, in file order. `images` is
    `load_vg_images(images_path)`; every image must be in it."""
    path = Path(path)
    regions = []
    for where, image_id, region in _vg_entries(path, "regions", images, Path(images_path)):
        phrase = _field(region, "phrase", str, path, where).strip()
        if not phrase:
            raise InputError(f"{where} has an empty phrase", path)
        x, y, w, h = (_field(region, key, (int, float), path, where) for key in ("x", "y", "width", "height"))
        regions.append(VGRegion(str(image_id), _field(region, "region_id", int, path, where), phrase, (x, y, x + w, y + h)))
    return regions


def load_vg_qa(path: str | Path, images: dict[int, VGImage], images_path: str | Path) -> list[VGQuestion]:
    """`question_answers.json`: every QA, in file order (`images` as for `load_vg_regions`)."""
    path = Path(path)
    questions = []
    for where, image_id, qa in _vg_entries(path, "qas", images, Path(images_path)):
        question, answer = (_field(qa, key, str, path, where).strip() for key in ("question", "answer"))
        if not question or not answer:
            raise InputError(f"{where} has an empty {'question' if not question else 'answer'}", path)
        questions.append(VGQuestion(str(image_id), _field(qa, "qa_id", int, path, where), question, answer))
    return questions


# ---------------------------------------------------------------------------------------------------
# Conceptual Captions and SBU Captions
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebCaption:
    row: int  # 0-based line number: img2dataset's key for the image fetched from `url`
    caption: str
    url: str


def load_cc_captions(path: str | Path) -> list[WebCaption]:
    """Conceptual Captions `caption<TAB>url` lines (no header), in file order."""
    path = Path(path)
    captions = []
    for row, line in enumerate(read_text_lines(path)):
        fields = line.split("\t")
        if len(fields) != 2:
            raise InputError(f"line {row + 1} has {len(fields) - 1} tabs, expected caption<TAB>url", path)
        caption, url = (field.strip() for field in fields)
        if not caption or not url:
            raise InputError(f"line {row + 1} has an empty {'caption' if not caption else 'url'}", path)
        captions.append(WebCaption(row, caption, url))
    return captions


def load_sbu_captions(captions_path: str | Path, urls_path: str | Path) -> list[WebCaption]:
    """SBU's two line-aligned files (`SBU_captioned_photo_dataset_captions.txt` and `..._urls.txt`)."""
    captions_path, urls_path = Path(captions_path), Path(urls_path)
    captions, urls = read_text_lines(captions_path), read_text_lines(urls_path)
    if len(captions) != len(urls):
        raise InputError(f"has {len(captions)} lines but {urls_path} has {len(urls)}; they must align", captions_path)
    records = []
    for row, (caption, url) in enumerate(zip(captions, urls)):
        caption, url = caption.strip(), url.strip()
        if not caption:
            raise InputError(f"line {row + 1} is empty", captions_path)
        if not url:
            raise InputError(f"line {row + 1} is empty", urls_path)
        records.append(WebCaption(row, caption, url))
    return records

