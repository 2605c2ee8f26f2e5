"""Loaders of the public formats on hand-written fixture files, their errors, and the answer helpers."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path
from typing import Callable

import pytest

from semvlp.data.answers import AnswerTable, vqa_soft_score, vqa_targets
from semvlp.data.formats import (
    Caption,
    CocoObject,
    FlickrImage,
    GQAQuestion,
    NLVR2Example,
    load_coco_captions,
    load_coco_instances,
    load_flickr30k,
    load_gqa,
    load_nlvr2,
    load_vqa,
)
from semvlp.errors import InputError

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
VQA_QUESTIONS = FIXTURES / "v2_OpenEnded_mscoco_val2014_questions.json"
VQA_ANNOTATIONS = FIXTURES / "v2_mscoco_val2014_annotations.json"


# ---------------------------------------------------------------------------------------------------
# Loaders on the fixtures: exact values
# ---------------------------------------------------------------------------------------------------


def test_coco_instances_with_attributes():
    instances = load_coco_instances(FIXTURES / "instances_val2014.json")
    assert [image.img_id for image in instances.images] == [
        "COCO_val2014_000000000042", "COCO_val2014_000000000073", "COCO_val2014_000000000074",
    ]
    first = instances.images[0]
    assert (first.image_id, first.file_name, first.width, first.height) == (42, "COCO_val2014_000000000042.jpg", 640, 480)
    # bbox [x, y, w, h] becomes (x1, y1, x2, y2) pixels.
    assert first.objects == (
        CocoObject(annotation_id=1001, box=(10.0, 20.0, 110.0, 70.0), category_id=18, attribute_ids=(1, 3)),
        CocoObject(annotation_id=1002, box=(300.5, 100.0, 340.5, 300.0), category_id=1, attribute_ids=()),
    )
    assert instances.images[1].objects == (CocoObject(1003, (0.0, 0.0, 427.0, 640.0), 1, (2,)),)
    assert instances.images[2].objects == ()  # an image without annotations is still listed
    assert instances.categories == {1: "person", 18: "dog"}
    assert instances.attributes == {1: "white", 2: "standing", 3: "small"}


def test_coco_instances_without_attributes():
    instances = load_coco_instances(FIXTURES / "instances_no_attributes.json")
    assert instances.attributes == {}
    (image,) = instances.images
    assert image.img_id == "COCO_train2014_000000000009"
    assert image.objects == (CocoObject(5, (1.08, 187.69, 1.08 + 611.59, 187.69 + 285.84), 52, ()),)
    assert instances.categories == {52: "banana"}


def test_coco_captions():
    captions = load_coco_captions(FIXTURES / "captions_val2014.json")
    assert len(captions) == 10
    assert captions[0] == Caption("COCO_val2014_000000000042", "A small white dog sits next to a man.", 501)
    assert captions[-1] == Caption("COCO_val2014_000000000073", "One person, nobody else.", 605)
    assert Counter(c.img_id for c in captions) == {"COCO_val2014_000000000042": 5, "COCO_val2014_000000000073": 5}


def test_vqa_with_annotations():
    questions = load_vqa(VQA_QUESTIONS, VQA_ANNOTATIONS)
    assert [q.question_id for q in questions] == [42000, 42001, 73000]
    color, count, yes_no = questions
    assert color.img_id == "COCO_val2014_000000000042"
    assert color.question == "What color is the dog?"
    assert color.answers == ["white", "white", "White", "white", "the white", "white", "white and brown", "white", "brown", "white"]
    assert (color.answer_type, color.question_type, color.multiple_choice_answer) == ("other", "what color is the", "white")
    assert count.answers[2] == "one" and count.answers[6] == "1 " and count.answer_type == "number"
    assert yes_no.img_id == "COCO_val2014_000000000073"
    assert yes_no.answers == ["yes"] * 10 and yes_no.answer_type == "yes/no"


def test_vqa_questions_only():
    questions = load_vqa(VQA_QUESTIONS)
    assert [(q.question_id, q.img_id) for q in questions] == [
        (42000, "COCO_val2014_000000000042"), (42001, "COCO_val2014_000000000042"), (73000, "COCO_val2014_000000000073"),
    ]
    assert all(q.answers == [] and q.answer_type is None and q.multiple_choice_answer is None for q in questions)


def test_gqa():
    assert load_gqa(FIXTURES / "val_balanced_questions.json") == [
        GQAQuestion("05451384", "2354786", "What animal is to the left of the man?", "dog"),
        GQAQuestion("20968379", "n161313", "Is the dog white?", "yes"),
    ]


def test_nlvr2():
    examples = load_nlvr2(FIXTURES / "dev.json")  # has a blank line, which is skipped
    assert [e.identifier for e in examples] == ["dev-850-0-0", "dev-850-1-0", "dev-850-2-0", "dev-851-0-1"]
    assert [e.label for e in examples] == [True, False, True, False]
    assert examples[1] == NLVR2Example(
        identifier="dev-850-1-0",
        sentence="The left image contains twice the number of dogs as the right image.",
        label=False,
        left_img_id="dev-850-1-img0",
        right_img_id="dev-850-1-img1",
    )
    assert examples[3].left_img_id == "dev-851-0-img0"


def test_flickr30k_splits_in_file_order():
    path = FIXTURES / "dataset_flickr30k.json"
    train = load_flickr30k(path, "train")
    assert [image.img_id for image in train] == ["1000092795", "1000268201"]
    assert train[0].captions[1] == "Two young men are outside ."
    assert all(len(image.captions) == 5 for image in train)
    assert load_flickr30k(path, "val") == [FlickrImage("1001773457", [
        "A black dog and a spotted dog are fighting", "Two dogs play on the road .",
        "Two dogs on pavement moving toward each other .", "A black dog and a white dog .", "Dogs playing .",
    ])]
    assert [image.img_id for image in load_flickr30k(path, "test")] == ["1007129816"]


# ---------------------------------------------------------------------------------------------------
# Malformed input: InputError naming the file and the offending entry
# ---------------------------------------------------------------------------------------------------


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def _mutated(tmp_path: Path, fixture: str, mutate: Callable[[dict], None]) -> Path:
    data = copy.deepcopy(json.loads((FIXTURES / fixture).read_text()))
    mutate(data)
    return _write_json(tmp_path / fixture, data)


def _set(entry: dict, key: str, value) -> None:
    entry[key] = value


COCO_CASES = [
    (lambda d: d["annotations"][1].pop("bbox"), load_coco_instances, "annotation entry 1 has no field 'bbox'"),
    (lambda d: _set(d["annotations"][0], "bbox", [1, 2, 3]), load_coco_instances, "annotation entry 0 has bbox"),
    (lambda d: _set(d["annotations"][2], "image_id", 999), load_coco_instances, "annotation entry 2 names image_id 999"),
    (lambda d: _set(d["annotations"][0], "category_id", 7), load_coco_instances, "annotation entry 0 names category_id 7"),
    (lambda d: _set(d["annotations"][0], "attribute_ids", [1, 99]), load_coco_instances, "attribute id 99"),
    (lambda d: d.pop("attributes"), load_coco_instances, "annotation entry 0 names attribute id 1"),
    (lambda d: _set(d["images"][1], "width", "427"), load_coco_instances, "image entry 1 field 'width' is '427'"),
    (lambda d: _set(d["images"][1], "id", 42), load_coco_instances, "image entry 1 repeats id 42"),
    (lambda d: d.pop("categories"), load_coco_instances, "has no field 'categories'"),
]


@pytest.mark.parametrize("mutate, loader, message", COCO_CASES)
def test_coco_instances_errors(tmp_path, mutate, loader, message):
    path = _mutated(tmp_path, "instances_val2014.json", mutate)
    with pytest.raises(InputError, match=message) as err:
        loader(path)
    assert str(path) in str(err.value)


def test_coco_captions_errors(tmp_path):
    path = _mutated(tmp_path, "captions_val2014.json", lambda d: _set(d["annotations"][3], "caption", 17))
    with pytest.raises(InputError, match="annotation entry 3 field 'caption' is 17, expected a string") as err:
        load_coco_captions(path)
    assert str(path) in str(err.value)


VQA_ANNOTATION_CASES = [
    (lambda d: d["annotations"].pop(), "question 73000 of .* has no annotation"),
    (lambda d: _set(d["annotations"][0], "answers", []), "annotation entry 0 has an empty answers list"),
    (lambda d: _set(d["annotations"][1]["answers"][4], "answer", None), "annotation entry 1 answer 4 field 'answer'"),
    (lambda d: _set(d["annotations"][2], "question_id", 5), "annotation entry 2 names question_id 5"),
    (lambda d: _set(d["annotations"][2], "image_id", 42), "annotation entry 2 has image_id 42 but question 73000"),
    (lambda d: _set(d, "data_subtype", "train2014"), "data_subtype 'train2014' differs"),
    (lambda d: d["annotations"][0].pop("answer_type"), "annotation entry 0 has no field 'answer_type'"),
]


@pytest.mark.parametrize("mutate, message", VQA_ANNOTATION_CASES)
def test_vqa_annotation_errors(tmp_path, mutate, message):
    path = _mutated(tmp_path, VQA_ANNOTATIONS.name, mutate)
    with pytest.raises(InputError, match=message) as err:
        load_vqa(VQA_QUESTIONS, path)
    assert str(path) in str(err.value)


def test_vqa_question_errors(tmp_path):
    path = _mutated(tmp_path, VQA_QUESTIONS.name, lambda d: d["questions"][1].pop("question_id"))
    with pytest.raises(InputError, match="question entry 1 has no field 'question_id'"):
        load_vqa(path)
    path = _mutated(tmp_path, VQA_QUESTIONS.name, lambda d: d.pop("data_subtype"))
    with pytest.raises(InputError, match="the file has no field 'data_subtype'"):
        load_vqa(path, VQA_ANNOTATIONS)


def test_gqa_errors(tmp_path):
    path = _mutated(tmp_path, "val_balanced_questions.json", lambda d: d["20968379"].pop("imageId"))
    with pytest.raises(InputError, match="question '20968379' has no field 'imageId'") as err:
        load_gqa(path)
    assert str(path) in str(err.value)
    with pytest.raises(InputError, match="expected a JSON object mapping question ids"):
        load_gqa(_write_json(tmp_path / "list.json", [1, 2]))
    # The unlabelled test files have no answer: that is allowed.
    path = _mutated(tmp_path, "val_balanced_questions.json", lambda d: d["05451384"].pop("answer"))
    assert load_gqa(path)[0].answer is None


def _nlvr2_with_line(tmp_path: Path, line_number: int, replace: Callable[[dict], None] | str) -> Path:
    lines = (FIXTURES / "dev.json").read_text().splitlines()
    if isinstance(replace, str):
        lines[line_number - 1] = replace
    else:
        entry = json.loads(lines[line_number - 1])
        replace(entry)
        lines[line_number - 1] = json.dumps(entry)
    path = tmp_path / "dev.json"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "line, replace, message",
    [
        (2, lambda e: _set(e, "label", "true"), "line 2 has label 'true', expected \"True\" or \"False\""),
        (5, lambda e: _set(e, "label", True), "line 5 has label True"),
        (1, lambda e: e.pop("sentence"), "line 1 has no field 'sentence'"),
        (3, lambda e: _set(e, "identifier", "dev-850-2"), "line 3 has identifier 'dev-850-2'"),
        (3, lambda e: _set(e, "identifier", "dev-850-0-0"), "line 3 repeats identifier 'dev-850-0-0'"),
        (5, '{"identifier": "dev-851-0-1", ', "line 5 is not valid JSON"),
    ],
)
def test_nlvr2_errors(tmp_path, line, replace, message):
    path = _nlvr2_with_line(tmp_path, line, replace)
    with pytest.raises(InputError, match=message) as err:
        load_nlvr2(path)
    assert str(path) in str(err.value)


def test_nlvr2_without_labels(tmp_path):
    path = _nlvr2_with_line(tmp_path, 1, lambda e: e.pop("label"))
    assert load_nlvr2(path)[0].label is None


def test_flickr30k_errors(tmp_path):
    path = FIXTURES / "dataset_flickr30k.json"
    with pytest.raises(InputError, match="unknown split 'dev'") as err:
        load_flickr30k(path, "dev")
    assert str(path) in str(err.value)
    bad = _mutated(tmp_path, path.name, lambda d: _set(d["images"][2], "split", "holdout"))
    with pytest.raises(InputError, match="image entry 2 has unknown split 'holdout'"):
        load_flickr30k(bad, "train")
    bad = _mutated(tmp_path, path.name, lambda d: d["images"][1]["sentences"][3].pop("raw"))
    with pytest.raises(InputError, match="image entry 1 sentence 3 has no field 'raw'"):
        load_flickr30k(bad, "train")
    bad = _mutated(tmp_path, path.name, lambda d: _set(d, "images", [d["images"][0]]))
    with pytest.raises(InputError, match="has no images in split 'test'"):
        load_flickr30k(bad, "test")


def test_missing_and_unparsable_files(tmp_path):
    missing = tmp_path / "nowhere.json"
    for load in (load_coco_instances, load_coco_captions, load_vqa, load_gqa, load_nlvr2):
        with pytest.raises(InputError, match="file not found") as err:
            load(missing)
        assert str(missing) in str(err.value)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(InputError, match="not valid JSON"):
        load_flickr30k(broken, "train")
    with pytest.raises(InputError, match="file not found"):
        load_vqa(VQA_QUESTIONS, missing)


# ---------------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------------


def test_vqa_soft_scores():
    assert [vqa_soft_score(n) for n in range(7)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        vqa_soft_score(-1)


def test_vqa_targets_normalise_answers():
    color, count, yes_no = load_vqa(VQA_QUESTIONS, VQA_ANNOTATIONS)
    # "White" and "the white" count as "white": 8 annotators.
    assert vqa_targets(color.answers) == {"white": 1.0, "white and brown": 0.3, "brown": 0.3}
    # "one", "1 " and "One." count as "1": 9 annotators.
    assert vqa_targets(count.answers) == {"1": 1.0, "2": 0.3}
    assert vqa_targets(yes_no.answers) == {"yes": 1.0}
    assert vqa_targets(["Two", "two.", "2", "3"]) == {"2": 0.9, "3": 0.3}


def test_answer_table_from_counts_and_round_trip(tmp_path):
    counts = Counter({"yes": 5, "no": 5, "2": 3, "red": 1, "blue": 3})
    table = AnswerTable.from_counts(counts, min_count=2)
    assert table.answers == ["no", "yes", "2", "blue"]  # by count, ties alphabetically
    assert table.index == {"no": 0, "yes": 1, "2": 2, "blue": 3}
    assert len(table) == 4 and "red" not in table and "blue" in table
    table.save(tmp_path / "answers.json")
    assert AnswerTable.load(tmp_path / "answers.json") == table
    with pytest.raises(ValueError, match="min_count"):
        AnswerTable.from_counts(counts, 0)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"answers": ["yes", "yes"]}, "answer 'yes' appears twice"),
        ({"answers": ["yes", 2]}, "answer 1 is 2, expected a string"),
        (["yes"], "expected a JSON object"),
    ],
)
def test_answer_table_load_errors(tmp_path, content, message):
    path = _write_json(tmp_path / "answers.json", content)
    with pytest.raises(InputError, match=message) as err:
        AnswerTable.load(path)
    assert str(path) in str(err.value)
