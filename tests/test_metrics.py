"""Tests of the official metrics on hand-computed cases and on small files in the official formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from semvlp.errors import InputError
from semvlp.metrics import (
    evaluate_gqa,
    evaluate_nlvr2,
    evaluate_retrieval,
    evaluate_vqa,
    normalize_vqa_answer,
    retrieval_recalls,
    vqa_question_accuracy,
)

# ---------------------------------------------------------------------------------------------------
# VQA normalisation and per-question accuracy
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        # number words (and "none") become digits, after lowercasing
        ("two", "2"),
        ("Ten", "10"),
        ("none", "0"),
        ("twenty", "twenty"),
        # articles are dropped, after the number-word mapping
        ("a dog", "dog"),
        ("The an apple", "apple"),
        ("a", ""),
        # missing-apostrophe contractions restored with an ASCII apostrophe
        ("dont", "don't"),
        ("Wouldnt've", "wouldn't've"),
        ("somebody'd", "somebodyd"),  # the official table's reversed entry
        ("Im", "im"),  # capitalised keys of the official table never match lowercased text
        ("dog's", "dog's"),  # apostrophes are not punctuation
        # punctuation touching a space is deleted, otherwise replaced by a space
        ("hello, world", "hello world"),
        ("t-shirt", "t shirt"),
        ("(dog)", "dog"),
        ("yes!", "yes"),
        ("2, 3", "2 3"),
        ("x:y", "x:y"),  # the colon is not in the official list
        # a digit-comma-digit anywhere deletes all punctuation instead
        ("1,000", "1000"),
        ("1,000 (approx)", "1000 approx"),
        ("t-shirt 1,5", "tshirt 15"),
        # periods not followed by a digit are deleted (look-ahead only: "3." loses it)
        ("red.", "red"),
        ("3.", "3"),
        ("2.5", "2.5"),
        ("mr.t", "mrt"),
        ("." * 40 + "x", "." * 8 + "x"),  # the official call removes at most 32 periods
        # whitespace
        ("  a\tbig\ndog  ", "big dog"),
        ("two  dogs", "2 dogs"),
    ],
)
def test_normalize_vqa_answer(raw: str, normalised: str) -> None:
    assert normalize_vqa_answer(raw) == normalised


def test_contractions_use_the_ascii_apostrophe() -> None:
    assert normalize_vqa_answer("dont") == "don\u0027t"
    assert "\u2019" not in normalize_vqa_answer("couldnt've")


@pytest.mark.parametrize(
    ("matching", "expected"),
    [
        (0, 0.0),
        (1, 0.3),  # 9 leave-outs see 1 match (1/3), the matching one sees 0
        (2, 0.6),  # 8 x 2/3 + 2 x 1/3
        (3, 0.9),  # 7 x 1 + 3 x 2/3
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_leave_one_out_partial_agreement(matching: int, expected: float) -> None:
    gt_answers = ["cat"] * matching + ["dog"] * (10 - matching)
    assert vqa_question_accuracy("cat", gt_answers) == pytest.approx(expected, abs=1e-12)


# (prediction, ground truth, official vqaEval.py as it stands (a013f00, 2021), as it was before (a4f1afd)).
# The expected values are what the two states of the official file give (run outside this repository).
OFFICIAL_VQA_CASES = [
    # all ten identical: today the prediction is compared as it is; before, it was normalised
    ("Two.", ["2"] * 10, 0.0, 1.0),
    ("the dog", ["dog"] * 10, 0.0, 1.0),
    ("Yes", ["yes"] * 10, 0.0, 1.0),
    ("1,000", ["1,000"] * 10, 1.0, 0.0),  # before: the prediction became "1000", the ground truth stayed
    (" yes\n", ["yes"] * 10, 1.0, 1.0),  # whitespace is cleaned in both
    # not all identical: today both sides are fully normalised; before, the ground truth got punctuation only
    ("two", ["two"] * 8 + ["2"] * 2, 1.0, 0.6),
    ("yes", ["yes!"] * 9 + ["no"], 1.0, 0.0),  # before: "yes!" -> "yes " (trailing space) matched nothing
    ("dog", ["Dog"] * 3 + ["dog "] * 7, 1.0, 0.0),
    ("1,000", ["1,000"] * 9 + ["1000"], 1.0, 1.0),
    ("yes", ["yes"] * 9 + ["no!"], 1.0, 1.0),
    ("a dog", ["dog"] * 5 + ["a dog"] * 5, 1.0, 1.0),
    ("dont", ["don't"] * 6 + ["no"] * 4, 1.0, 1.0),
    ("cat", ["cat"] * 2 + ["dog"] * 8, 0.6, 0.6),
]


@pytest.mark.parametrize(("prediction", "gt_answers", "official", "legacy"), OFFICIAL_VQA_CASES)
def test_vqa_accuracy_follows_the_official_evaluator_and_its_earlier_state(
    prediction: str, gt_answers: list[str], official: float, legacy: float
) -> None:
    assert vqa_question_accuracy(prediction, gt_answers) == pytest.approx(official, abs=1e-12)
    assert vqa_question_accuracy(prediction, gt_answers, legacy_normalization=True) == pytest.approx(legacy, abs=1e-12)


def test_evaluate_vqa_command_has_the_legacy_switch(tmp_path: Path, capsys) -> None:
    """`semvlp evaluate vqa` scores as the official file stands; --legacy-normalization as it was."""
    from semvlp.cli import main

    questions = {"data_subtype": "val2014", "questions": [
        {"question_id": i, "image_id": 1, "question": "?"} for i in range(len(OFFICIAL_VQA_CASES))]}
    annotations = {"annotations": [
        _vqa_annotation(i, "other", gt) for i, (_, gt, _, _) in enumerate(OFFICIAL_VQA_CASES)]}
    predictions = [{"question_id": i, "answer": p} for i, (p, _, _, _) in enumerate(OFFICIAL_VQA_CASES)]
    paths = [_write_json(tmp_path / name, obj) for name, obj in
             (("q.json", questions), ("a.json", annotations), ("p.json", predictions))]
    args = ["evaluate", "vqa", "--questions", str(paths[0]), "--annotations", str(paths[1]), "--predictions", str(paths[2])]
    for extra, column in (([], 2), (["--legacy-normalization"], 3)):
        assert main(args + extra) == 0
        expected = round(100 * sum(case[column] for case in OFFICIAL_VQA_CASES) / len(OFFICIAL_VQA_CASES), 2)
        assert json.loads(capsys.readouterr().out)["accuracy"] == expected
    assert evaluate_vqa(*paths)["accuracy"] != evaluate_vqa(*paths, legacy_normalization=True)["accuracy"]


# ---------------------------------------------------------------------------------------------------
# VQA files
# ---------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def _vqa_annotation(question_id: int, answer_type: str, answers: list[str]) -> dict:
    return {
        "question_id": question_id,
        "image_id": 1,
        "answer_type": answer_type,
        "question_type": "how many",
        "answers": [
            {"answer": answer, "answer_confidence": "yes", "answer_id": i + 1} for i, answer in enumerate(answers)
        ],
    }


@pytest.fixture
def vqa_files(tmp_path: Path) -> tuple[Path, Path]:
    """Three questions: two "number" (accuracies 0.6 and 1.0) and one "yes/no" (0.3) for `vqa_predictions`."""
    questions = {"questions": [{"question_id": qid, "image_id": 1, "question": "?"} for qid in (11, 12, 13)]}
    annotations = {
        "annotations": [
            # the two agreeing annotators come last: the buggy 2015 breakdown would use 1/3 here
            _vqa_annotation(11, "number", ["3"] * 8 + ["2"] * 2),
            _vqa_annotation(12, "number", ["4"] * 10),
            _vqa_annotation(13, "yes/no", ["yes"] + ["no"] * 9),
        ]
    }
    return (
        _write_json(tmp_path / "questions.json", questions),
        _write_json(tmp_path / "annotations.json", annotations),
    )


VQA_PREDICTIONS = [
    {"question_id": 13, "answer": "Yes"},
    {"question_id": 11, "answer": "two"},
    {"question_id": 12, "answer": "four"},
]


def test_evaluate_vqa_overall_and_per_answer_type(vqa_files: tuple[Path, Path], tmp_path: Path) -> None:
    predictions = _write_json(tmp_path / "predictions.json", VQA_PREDICTIONS)
    # "four" against ten "4": the official file today compares it as it is when all ten agree (0.0)
    assert evaluate_vqa(*vqa_files, predictions) == {
        "accuracy": 30.0,  # 100 * (0.6 + 0.0 + 0.3) / 3
        "per_answer_type": {"number": 30.0, "yes/no": 30.0},  # means of the per-question accuracies
        "num_questions": 3,
    }
    # before 2021 it normalised every prediction ("four" -> "4": 1.0)
    assert evaluate_vqa(*vqa_files, predictions, legacy_normalization=True) == {
        "accuracy": 63.33,  # 100 * (0.6 + 1.0 + 0.3) / 3
        "per_answer_type": {"number": 80.0, "yes/no": 30.0},
        "num_questions": 3,
    }


@pytest.mark.parametrize(
    ("predictions", "message"),
    [
        (VQA_PREDICTIONS[:2], "predictions.json: question 12 has no prediction"),
        (
            VQA_PREDICTIONS + [{"question_id": 17, "answer": "x"}],
            "predictions.json: entry 3 names question_id 17 which is not in questions.json",
        ),
        (
            VQA_PREDICTIONS + [{"question_id": 11, "answer": "x"}],
            "predictions.json: entry 3 repeats question_id 11",
        ),
        (
            [{"question_id": 99, "answer": "x"}, {"question_id": 11, "answer": "x"}] + VQA_PREDICTIONS[1:],
            "entry 0 names question_id 99",  # the first offending entry, not the later repeat
        ),
        ([{"questionId": 11, "answer": "x"}] + VQA_PREDICTIONS[1:], 'entry 0 has no "question_id" field'),
        (
            VQA_PREDICTIONS[:2] + [{"question_id": "12", "answer": "x"}],
            'entry 2 has "question_id" = "12"; expected int',
        ),
        (VQA_PREDICTIONS[:2] + [{"question_id": 12, "answer": 4}], 'entry 2 has "answer" = 4; expected str'),
        (VQA_PREDICTIONS[:2] + [{"question_id": True, "answer": "4"}], 'entry 2 has "question_id" = true'),
        (VQA_PREDICTIONS[:2] + [[12, "4"]], "entry 2 is not a JSON object"),
        ({"predictions": VQA_PREDICTIONS}, "expected a JSON list of predictions"),
    ],
)
def test_evaluate_vqa_rejects_bad_predictions(
    vqa_files: tuple[Path, Path], tmp_path: Path, predictions: object, message: str
) -> None:
    path = _write_json(tmp_path / "predictions.json", predictions)
    with pytest.raises(InputError) as err:
        evaluate_vqa(*vqa_files, path)
    assert message in str(err.value)
    assert err.value.path == path


def test_evaluate_vqa_rejects_invalid_json(vqa_files: tuple[Path, Path], tmp_path: Path) -> None:
    path = tmp_path / "predictions.json"
    path.write_text('[{"question_id": 11, "answer": "2"},')
    with pytest.raises(InputError, match="predictions.json: not valid JSON"):
        evaluate_vqa(*vqa_files, path)


def test_evaluate_vqa_rejects_annotations_that_disagree_with_questions(
    vqa_files: tuple[Path, Path], tmp_path: Path
) -> None:
    questions_path, annotations_path = vqa_files
    annotations = json.loads(annotations_path.read_text())
    annotations["annotations"].pop(1)
    _write_json(annotations_path, annotations)
    predictions = _write_json(tmp_path / "predictions.json", VQA_PREDICTIONS)
    with pytest.raises(InputError, match="annotations.json: question 12 has no annotation"):
        evaluate_vqa(questions_path, annotations_path, predictions)


# ---------------------------------------------------------------------------------------------------
# GQA
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def gqa_questions(tmp_path: Path) -> Path:
    questions = {
        "201": {"imageId": "n1", "question": "Is it red?", "answer": "yes"},
        "202": {"imageId": "n1", "question": "What color?", "answer": "red"},
        "203": {"imageId": "n2", "question": "What is it?", "answer": "t-shirt"},
        "204": {"imageId": "n2", "question": "Where?", "answer": "table"},
    }
    return _write_json(tmp_path / "val_balanced_questions.json", questions)


def test_evaluate_gqa_exact_match(gqa_questions: Path, tmp_path: Path) -> None:
    predictions = [
        {"questionId": "201", "prediction": "yes"},  # right
        {"questionId": "202", "prediction": "Red"},  # no normalisation: wrong
        {"questionId": "203", "prediction": "t-shirt"},  # right
        {"questionId": "204", "prediction": "the table"},  # wrong
    ]
    result = evaluate_gqa(gqa_questions, _write_json(tmp_path / "predictions.json", predictions))
    assert result == {"accuracy": 50.0, "num_questions": 4}


def test_accuracy_rounds_exact_halves_away_from_zero(tmp_path: Path) -> None:
    """97 of 800 right is exactly 12.125 %: Python 2's round (the official evaluator's) gives 12.13."""
    questions = {str(i): {"imageId": "n", "question": "?", "answer": "yes"} for i in range(800)}
    predictions = [{"questionId": str(i), "prediction": "yes" if i < 97 else "no"} for i in range(800)]
    questions_path = _write_json(tmp_path / "questions.json", questions)
    result = evaluate_gqa(questions_path, _write_json(tmp_path / "predictions.json", predictions))
    assert result["accuracy"] == 12.13


GQA_PREDICTIONS = [{"questionId": qid, "prediction": "yes"} for qid in ("201", "202", "203", "204")]


@pytest.mark.parametrize(
    ("predictions", "message"),
    [
        (GQA_PREDICTIONS[1:], 'predictions.json: question "201" has no prediction'),
        (
            GQA_PREDICTIONS + [{"questionId": "999", "prediction": "no"}],
            'entry 4 names questionId "999" which is not in val_balanced_questions.json',
        ),
        (GQA_PREDICTIONS + [{"questionId": "203", "prediction": "no"}], 'entry 4 repeats questionId "203"'),
        ([{"question_id": "201", "prediction": "yes"}, *GQA_PREDICTIONS[1:]], 'entry 0 has no "questionId" field'),
        ([{"questionId": 201, "prediction": "yes"}, *GQA_PREDICTIONS[1:]], '"questionId" = 201; expected str'),
        ([{"questionId": "201", "answer": "yes"}] + GQA_PREDICTIONS[1:], 'entry 0 has no "prediction" field'),
    ],
)
def test_evaluate_gqa_rejects_bad_predictions(
    gqa_questions: Path, tmp_path: Path, predictions: list, message: str
) -> None:
    path = _write_json(tmp_path / "predictions.json", predictions)
    with pytest.raises(InputError) as err:
        evaluate_gqa(gqa_questions, path)
    assert message in str(err.value)
    assert err.value.path == path


# ---------------------------------------------------------------------------------------------------
# NLVR2
# ---------------------------------------------------------------------------------------------------

NLVR2_EXAMPLES = [
    ("dev-850-0-0", "True"),
    ("dev-850-1-0", "False"),
    ("dev-850-2-0", "True"),  # sentence dev-850--0: three image pairs
    ("dev-850-0-1", "False"),  # sentence dev-850--1
    ("dev-851-0-0", "True"),
    ("dev-851-1-0", "True"),  # sentence dev-851--0
]


@pytest.fixture
def nlvr2_data(tmp_path: Path) -> Path:
    path = tmp_path / "dev.json"
    lines = [json.dumps({"identifier": i, "sentence": "s", "label": label}) for i, label in NLVR2_EXAMPLES]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_evaluate_nlvr2_accuracy_and_consistency(nlvr2_data: Path, tmp_path: Path) -> None:
    predictions = tmp_path / "predictions.csv"
    predictions.write_text(
        "identifier,prediction\n"  # optional header
        "dev-850-0-0,True\n"
        "dev-850-1-0,false\n"  # labels compare case-insensitively
        "dev-850-2-0,False\n"  # wrong: sentence dev-850--0 is inconsistent
        "dev-850-0-1,False\n"  # sentence dev-850--1 consistent
        "dev-851-1-0,True\n"
        "dev-851-0-0,TRUE\n"  # sentence dev-851--0 consistent, in any line order
    )
    result = evaluate_nlvr2(nlvr2_data, predictions)
    assert result == {"accuracy": 83.33, "consistency": 66.67, "num_examples": 6}


def test_evaluate_nlvr2_without_header(nlvr2_data: Path, tmp_path: Path) -> None:
    predictions = tmp_path / "predictions.csv"
    flipped = {"True": "False", "False": "True"}
    predictions.write_text("".join(f"{i},{flipped[label]}\n" for i, label in NLVR2_EXAMPLES))
    assert evaluate_nlvr2(nlvr2_data, predictions) == {"accuracy": 0.0, "consistency": 0.0, "num_examples": 6}


_NLVR2_GOOD_LINES = [f"{i},{label}" for i, label in NLVR2_EXAMPLES]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (_NLVR2_GOOD_LINES[:-1], "predictions.csv: example \"dev-851-1-0\" has no prediction"),
        ([*_NLVR2_GOOD_LINES, "dev-999-0-0,True"], 'line 7 names identifier "dev-999-0-0" which is not in dev.json'),
        ([*_NLVR2_GOOD_LINES, "dev-850-0-0,False"], 'line 7 repeats identifier "dev-850-0-0"'),
        (
            ["identifier,prediction", *_NLVR2_GOOD_LINES[:2], "dev-850-2-0,yes", *_NLVR2_GOOD_LINES[3:]],
            "line 4 is 'dev-850-2-0,yes'",
        ),
        ([_NLVR2_GOOD_LINES[0], "dev-850-1-0,False,0.9", *_NLVR2_GOOD_LINES[2:]], "line 2 is 'dev-850-1-0,False,0.9'"),
        ([_NLVR2_GOOD_LINES[0], "dev-850-1-0 False", *_NLVR2_GOOD_LINES[2:]], "line 2 is 'dev-850-1-0 False'"),
    ],
)
def test_evaluate_nlvr2_rejects_bad_predictions(
    nlvr2_data: Path, tmp_path: Path, lines: list[str], message: str
) -> None:
    path = tmp_path / "predictions.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as err:
        evaluate_nlvr2(nlvr2_data, path)
    assert message in str(err.value)
    assert err.value.path == path


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"identifier": "dev-850-0", "label": "True"}, "line 2 has identifier 'dev-850-0'"),
        ({"identifier": "dev-850-1-0", "label": "yes"}, "line 2 has label 'yes'"),
        ({"identifier": "dev-850-1-0", "label": True}, 'line 2 has "label" = true; expected str'),
        ({"identifier": "dev-850-0-0", "label": "True"}, "line 2 repeats identifier 'dev-850-0-0'"),
    ],
)
def test_evaluate_nlvr2_rejects_bad_data(tmp_path: Path, record: dict, message: str) -> None:
    data = tmp_path / "dev.json"
    first = {"identifier": "dev-850-0-0", "label": "True"}
    data.write_text(json.dumps(first) + "\n" + json.dumps(record) + "\n")
    predictions = tmp_path / "predictions.csv"
    predictions.write_text("dev-850-0-0,True\n")
    with pytest.raises(InputError) as err:
        evaluate_nlvr2(data, predictions)
    assert message in str(err.value)
    assert err.value.path == data


# ---------------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------------


def test_retrieval_ties_break_by_index() -> None:
    # 3 images, one caption each; every score equal: ranks follow the index order.
    scores = np.zeros((3, 3))  # (captions, images)
    recalls = retrieval_recalls(scores, np.array([0, 1, 2]), ks=(1, 2))
    # text->image: caption 0's image has rank 0, caption 1's rank 1, caption 2's rank 2
    assert recalls["ir_r1"] == pytest.approx(100 / 3)
    assert recalls["ir_r2"] == pytest.approx(200 / 3)
    # image->text: the same by symmetry
    assert recalls["tr_r1"] == pytest.approx(100 / 3)
    assert recalls["tr_r2"] == pytest.approx(200 / 3)
    assert recalls["rsum"] == pytest.approx(200.0)


def test_retrieval_strictly_higher_scores_rank_first() -> None:
    # caption 1 (image 1) ties with image 0 for the top score; image 0 comes first, so R@1 misses.
    scores = np.array([[0.9, 0.1], [0.7, 0.7]])
    recalls = retrieval_recalls(scores, np.array([0, 1]), ks=(1,))
    assert recalls["ir_r1"] == 50.0
    # image 1's column: caption 0 scores 0.1 < 0.7 -> caption 1 first; image 0's column: caption 0 first
    assert recalls["tr_r1"] == 100.0


def test_retrieval_image_to_text_hit_when_any_caption_is_in_top_k() -> None:
    # 2 images x 5 captions; image 0's column ranks only its last caption (4) first.
    caption_image = np.repeat([0, 1], 5)  # (10,)
    scores = np.zeros((10, 2))
    scores[5:, 0] = 0.5  # image 1's captions outrank most of image 0's in column 0 ...
    scores[4, 0] = 0.9  # ... except caption 4, which ranks first
    scores[5:, 1] = 1.0
    recalls = retrieval_recalls(scores, caption_image, ks=(1, 5))
    assert recalls["tr_r1"] == 100.0
    # text->image: captions 0..3 score 0 for both images -> image 0 wins the tie; all 10 hit at 1
    assert recalls["ir_r1"] == 100.0
    # demote caption 4: column 0's top five are then image 1's captions -> image 0 misses R@5
    scores[4, 0] = 0.0
    recalls = retrieval_recalls(scores, caption_image, ks=(1, 5, 6))
    assert (recalls["tr_r1"], recalls["tr_r5"], recalls["tr_r6"]) == (50.0, 50.0, 100.0)


def _brute_force_recalls(scores: np.ndarray, caption_image: np.ndarray, k: int) -> tuple[float, float]:
    """The documented rank rule, counted directly: strictly higher, plus equal with a smaller index."""
    num_captions, num_images = scores.shape

    def rank(values: np.ndarray, index: int) -> int:
        higher = int((values > values[index]).sum())
        return higher + int((values[:index] == values[index]).sum())

    ir = [rank(scores[c], caption_image[c]) < k for c in range(num_captions)]
    tr = [
        min(rank(scores[:, i], c) for c in np.flatnonzero(caption_image == i)) < k for i in range(num_images)
    ]
    return 100 * float(np.mean(ir)), 100 * float(np.mean(tr))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_matches_the_rank_rule_on_random_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    caption_image = np.repeat(np.arange(8), rng.integers(1, 6, size=8))
    scores = rng.integers(0, 4, size=(len(caption_image), 8)).astype(np.float32)  # many ties
    recalls = retrieval_recalls(scores, caption_image, ks=(1, 3))
    for k in (1, 3):
        expected = _brute_force_recalls(scores, caption_image, k)
        assert (recalls[f"ir_r{k}"], recalls[f"tr_r{k}"]) == pytest.approx(expected)


@pytest.fixture
def karpathy_dataset(tmp_path: Path) -> Path:
    def image(name: str, split: str, captions: int) -> dict:
        sentences = [{"raw": f"{name} {j}.", "tokens": [name, str(j)], "sentid": j} for j in range(captions)]
        return {"filename": f"{name}.jpg", "split": split, "sentences": sentences}

    images = [image("a", "test", 2), image("b", "train", 3), image("c", "test", 2), image("d", "test", 1)]
    return _write_json(tmp_path / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})


def test_evaluate_retrieval_uses_split_in_file_order(karpathy_dataset: Path, tmp_path: Path) -> None:
    # test images a, c, d; captions a0 a1 c0 c1 d0 (rows). Every caption is best on its own image
    # except c1, which prefers d.
    scores = np.array(
        [
            [0.9, 0.1, 0.2],
            [0.8, 0.1, 0.1],
            [0.1, 0.7, 0.2],
            [0.1, 0.3, 0.6],
            [0.1, 0.2, 0.9],
        ],
        dtype=np.float32,
    )
    path = tmp_path / "scores.npy"
    np.save(path, scores)
    result = evaluate_retrieval(karpathy_dataset, "test", path)
    assert result == {
        "ir_r1": 80.0, "ir_r5": 100.0, "ir_r10": 100.0,
        "tr_r1": 100.0, "tr_r5": 100.0, "tr_r10": 100.0,
        "rsum": 580.0, "num_captions": 5, "num_images": 3,
    }


@pytest.mark.parametrize(
    ("scores", "message"),
    [
        (np.zeros((5, 4)), "scores.npy: score matrix has shape (5, 4), expected (5, 3)"),
        (np.zeros((3, 5)), "has shape (3, 5), expected (5, 3)"),
        (np.zeros(15), "has shape (15,), expected (5, 3)"),
        (np.where(np.eye(5, 3) > 0, np.nan, 0.0), "score [0, 0] is NaN"),
        (np.array([[0.0, 0.0, 0.0]] * 4 + [[0.0, np.nan, 0.0]]), "score [4, 1] is NaN"),
        (np.full((5, 3), "x"), "scores must be real numbers"),
    ],
)
def test_evaluate_retrieval_rejects_bad_scores(
    karpathy_dataset: Path, tmp_path: Path, scores: np.ndarray, message: str
) -> None:
    path = tmp_path / "scores.npy"
    np.save(path, scores)
    with pytest.raises(InputError) as err:
        evaluate_retrieval(karpathy_dataset, "test", path)
    assert message in str(err.value)
    assert err.value.path == path


def test_evaluate_retrieval_rejects_unreadable_scores_and_unknown_split(
    karpathy_dataset: Path, tmp_path: Path
) -> None:
    path = tmp_path / "scores.npy"
    path.write_text("not an array")
    with pytest.raises(InputError, match="scores.npy: not a readable .npy array"):
        evaluate_retrieval(karpathy_dataset, "test", path)
    np.save(path, np.zeros((5, 3)))
    with pytest.raises(InputError, match="dataset_flickr30k.json: has no images in split 'tset'"):
        evaluate_retrieval(karpathy_dataset, "tset", path)
