"""Official evaluation metrics for VQA v2, GQA, NLVR2 and Flickr30K retrieval.

VQA follows the official evaluator (GT-Vision-Lab/VQA, `PythonEvaluationTools/vqaEvaluation/vqaEval.py`)
as released for VQA v2 (commit 458a8b2, Oct 2016, unchanged in the v2.0 release), behaviour for
behaviour; the comments below name each quirk kept on purpose. Two later or earlier states of that file
are *not* followed:

* the 2015 state, whose contraction table used the right single quote (U+2019) in its restored forms
  (so "dont" became "don’t" and never matched an annotation) and whose per-type breakdowns averaged the
  last leave-one-out score instead of the question's mean. Both were fixed upstream in 2015/2016; this
  module uses ASCII apostrophes and per-question means, as the fixed file does.
* the March 2021 change (commit a013f00), which normalises the prediction only when the ten ground-truth
  answers disagree. Published VQA v2 numbers predate it; here the prediction is always normalised.

GQA is exact string match, NLVR2 follows the official `nlvr2/eval/metrics.py` (case-insensitive label
comparison, consistency over sentences), retrieval reports R@1/5/10 in both directions.

Every `evaluate_*` function checks its inputs completely before scoring: a prediction file that misses
an item, names an unknown or repeated id, or is malformed raises `InputError` naming the file and the
first offending entry. Nothing is silently scored as wrong or skipped. JSON list entries are counted
from 0 (the index a JSON tool would use); text lines are counted from 1.
"""

from __future__ import annotations

import json
import re
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np

from semvlp.data.formats import load_vqa
from semvlp.errors import InputError
from semvlp.io import read_json, read_text_lines

# ---------------------------------------------------------------------------------------------------
# VQA answer normalisation (tables and rules of the official evaluator)
# ---------------------------------------------------------------------------------------------------

# Characters the official evaluator treats as punctuation. Note: no period (handled separately), no
# apostrophe (contractions keep it) and no colon.
_VQA_PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)

# The official pattern is "(?!<=\d)(\.)(?!\d)". Its first group is a negative *look-ahead* for the
# two characters "<=" (most likely meant as a look-behind); in front of a "." it always succeeds, so the
# rule is really "drop every period not followed by a digit": "3." -> "3", "2.5" and ".5" keep theirs.
# The official patterns are compiled without re.UNICODE under Python 2, so \d means ASCII digits only.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?![0-9])")
_DIGIT_COMMA_DIGIT = re.compile(r"[0-9],[0-9]")
# The official call is `periodStrip.sub("", text, re.UNICODE)`: the flag lands in the `count`
# parameter, so at most re.UNICODE == 32 periods are removed from one answer.
_OFFICIAL_PERIOD_REMOVAL_LIMIT = 32

_VQA_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

_VQA_ARTICLES = frozenset({"a", "an", "the"})

# Missing-apostrophe spellings and their restored form, ASCII apostrophes as in the fixed official
# table. Kept verbatim, oddities included: "somebody'd" maps to "somebodyd" (reversed upstream), and
# "let's"/"she's" map to themselves. The official table also has four capitalised keys (Id've, I'dve,
# Im, Ive); answers are lowercased before this lookup, so those can never match and are left out.
_VQA_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

# Annotators whose answer must match (among the other annotators) for full credit.
_VQA_FULL_CREDIT_MATCHES = 3


def _vqa_strip_punctuation(text: str) -> str:
    """The official punctuation step (the only step ground-truth answers ever get).

    Each punctuation mark is deleted when it touches a space somewhere in the *original* text, or when
    the text contains a digit-comma-digit ("1,000"); otherwise every occurrence becomes a space. Then
    periods not followed by a digit are deleted (at most 32, see `_OFFICIAL_PERIOD_REMOVAL_LIMIT`).
    """
    has_digit_comma_digit = _DIGIT_COMMA_DIGIT.search(text) is not None
    result = text
    for mark in _VQA_PUNCTUATION:
        # The tests look at the original text, the replacement acts on the running result.
        touches_space = (mark + " ") in text or (" " + mark) in text
        result = result.replace(mark, "" if touches_space or has_digit_comma_digit else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", result, count=_OFFICIAL_PERIOD_REMOVAL_LIMIT)


def _vqa_digits_articles_contractions(text: str) -> str:
    """Lowercase, number words to digits, drop articles, restore contractions; re-join with one space."""
    words = [_VQA_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    # Number words are mapped before the article test, contractions after it, as upstream.
    kept = [word for word in words if word not in _VQA_ARTICLES]
    return " ".join(_VQA_CONTRACTIONS.get(word, word) for word in kept)


def normalize_vqa_answer(answer: str) -> str:
    """Normalise an answer the way the official VQA evaluator normalises predictions.

    Newlines and tabs become spaces, the ends are stripped, punctuation and periods are processed,
    then the text is lowercased, number words zero..ten and "none" become digits, articles a/an/the
    are dropped and missing-apostrophe contractions are restored ("dont" -> "don't").
    Also used to normalise training answers, so that they are in the form the annotations use.
    """
    return _vqa_digits_articles_contractions(_vqa_strip_punctuation(_vqa_whitespace(answer)))


def _vqa_whitespace(text: str) -> str:
    """Newlines and tabs to spaces, ends stripped: what every answer gets first."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_question_accuracy(prediction: str, gt_answers: Sequence[str], *, legacy_normalization: bool = False) -> float:
    """Official VQA accuracy of one raw (not yet normalised) prediction, in [0, 1].

    As the official vqaEval.py stands today (GT-Vision-Lab/VQA a013f00, "Fixed processing answers bug",
    2021): every answer gets its whitespace cleaned; then, only when the ground-truth answers are not
    all identical, both the prediction and the ground truth are fully normalised (`normalize_vqa_answer`).
    When all ten agree, the prediction must equal them as it is ("Yes" does not match "yes" x 10).
    With `legacy_normalization` (the file before a013f00, 2016-2021): the prediction is always fully
    normalised, the ground truth only gets the punctuation step and only when not all identical.
    For each annotator, leave that annotator out and score min(1, matches among the others / 3);
    return the mean over annotators. Example: 2 of 10 agree -> (8 * 2/3 + 2 * 1/3) / 10 = 0.6.
    """
    if len(gt_answers) == 0:
        raise ValueError("a VQA question needs at least one ground-truth answer")
    if legacy_normalization:
        predicted = normalize_vqa_answer(prediction)
        if len(set(gt_answers)) > 1:
            references = [_vqa_strip_punctuation(answer) for answer in gt_answers]
        else:
            references = list(gt_answers)
    else:
        predicted = _vqa_whitespace(prediction)
        references = [_vqa_whitespace(answer) for answer in gt_answers]
        if len(set(references)) > 1:
            predicted = normalize_vqa_answer(predicted)
            references = [normalize_vqa_answer(answer) for answer in references]
    total_matches = sum(reference == predicted for reference in references)
    # Leaving annotator j out removes j's own match (if any) from the count.
    leave_one_out = [
        min(1.0, float(total_matches - (reference == predicted)) / _VQA_FULL_CREDIT_MATCHES)
        for reference in references
    ]
    return float(sum(leave_one_out)) / len(leave_one_out)


# ---------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------


def _round_2(value: float) -> float:
    """Round to 2 decimals the way the official VQA evaluator does (Python 2 `round`).

    Python 2 sends exact halves away from zero (Python 3 rounds them to even); rounding the exact
    binary value with ROUND_HALF_UP reproduces it for the non-negative numbers reported here.
    """
    return float(Decimal(value).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def _percent(fraction_sum: float, count: int) -> float:
    """100 * sum / count rounded to 2 decimals, with the official evaluator's operation order."""
    return _round_2(100 * float(fraction_sum) / count)


def _describe(value: Any) -> str:
    """A short JSON rendering of an offending value for an error message."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: Any) -> bool:
    # JSON true/false load as bool, which is an int subclass; an id is never a boolean.
    return isinstance(value, int) and not isinstance(value, bool)


def _require_list(data: Any, path: Path, what: str) -> list:
    if not isinstance(data, list):
        raise InputError(f"expected a JSON list of {what}, got {type(data).__name__}", path)
    return data


def _require_key_list(data: Any, key: str, path: Path) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise InputError(f'expected a JSON object with a list under "{key}"', path)
    return data[key]


def _require_fields(entry: Any, fields: dict[str, type], path: Path, where: str) -> dict:
    """Check that `entry` is an object whose `fields` exist with the given types (extra keys allowed)."""
    if not isinstance(entry, dict):
        raise InputError(f"{where} is not a JSON object: {_describe(entry)}", path)
    for name, expected in fields.items():
        if name not in entry:
            raise InputError(f'{where} has no "{name}" field (fields: {", ".join(sorted(entry))})', path)
        value = entry[name]
        ok = _is_int(value) if expected is int else isinstance(value, expected)
        if not ok:
            raise InputError(
                f'{where} has "{name}" = {_describe(value)}; expected {expected.__name__}', path
            )
    return entry


def _match_predictions(
    predicted: list[tuple[str, int | str, str]],
    expected_ids: Sequence[int | str],
    predictions_path: Path,
    reference_path: Path,
    id_name: str,
    item_name: str,
) -> dict[int | str, str]:
    """Map each expected id to its prediction; reject unknown, repeated and missing ids.

    predicted: (where, id, prediction) in file order, `where` naming the entry ("entry 3", "line 4").
    Unknown and repeated ids are reported at the first entry that has one; when every entry is fine,
    the first expected id (in reference-file order) without a prediction is reported.
    """
    expected = set(expected_ids)
    by_id: dict[int | str, str] = {}
    for where, item_id, prediction in predicted:
        if item_id not in expected:
            raise InputError(
                f"{where} names {id_name} {_describe(item_id)} which is not in {reference_path.name}",
                predictions_path,
            )
        if item_id in by_id:
            raise InputError(f"{where} repeats {id_name} {_describe(item_id)}", predictions_path)
        by_id[item_id] = prediction
    for item_id in expected_ids:
        if item_id not in by_id:
            raise InputError(f"{item_name} {_describe(item_id)} has no prediction", predictions_path)
    return by_id


def _unique_ids(ids: list[int | str], path: Path, entry_name: str, id_name: str) -> None:
    """Reject the first entry (counted from 0) that repeats an id of an earlier one."""
    seen: set[int | str] = set()
    for position, item_id in enumerate(ids):
        if item_id in seen:
            raise InputError(f"{entry_name} {position} repeats {id_name} {_describe(item_id)}", path)
        seen.add(item_id)


# ---------------------------------------------------------------------------------------------------
# VQA v2
# ---------------------------------------------------------------------------------------------------


def _vqa_question_ids(questions_path: Path) -> list[int]:
    questions = _require_key_list(read_json(questions_path), "questions", questions_path)
    question_ids = [
        _require_fields(q, {"question_id": int}, questions_path, f"question entry {i}")["question_id"]
        for i, q in enumerate(questions)
    ]
    if not question_ids:
        raise InputError("holds no questions", questions_path)
    _unique_ids(question_ids, questions_path, "question entry", "question_id")
    return question_ids


def _question_predictions(
    predictions_path: Path, question_ids: list, questions_path: Path, id_field: tuple[str, type], answer_field: str
) -> dict:
    """A JSON list of `{id_field: id, answer_field: str}` entries, checked to answer every question once:
    VQA's results file (`question_id`, `answer`: what EvalAI takes) or GQA's (`questionId`, `prediction`)."""
    id_name, id_type = id_field
    raw_predictions = _require_list(read_json(predictions_path), predictions_path, "predictions")
    predicted = []
    for i, entry in enumerate(raw_predictions):
        _require_fields(entry, {id_name: id_type, answer_field: str}, predictions_path, f"entry {i}")
        predicted.append((f"entry {i}", entry[id_name], entry[answer_field]))
    return _match_predictions(predicted, question_ids, predictions_path, questions_path, id_name, "question")


def _vqa_predictions(predictions_path: Path, question_ids: list[int], questions_path: Path) -> dict[int, str]:
    return _question_predictions(predictions_path, question_ids, questions_path, ("question_id", int), "answer")


def check_vqa_predictions(questions_path: str | Path, predictions_path: str | Path) -> dict:
    """The local check of a VQA test-server file (test-dev2015, test2015), which has no answers to
    score against: an entry per question of the split, each once, answers as strings.
    Returns `{"num_questions"}`; InputError naming the first problem otherwise."""
    questions_path, predictions_path = Path(questions_path), Path(predictions_path)
    question_ids = _vqa_question_ids(questions_path)
    _vqa_predictions(predictions_path, question_ids, questions_path)
    return {"num_questions": len(question_ids)}


def evaluate_vqa(
    questions_path: str | Path,
    annotations_path: str | Path,
    predictions_path: str | Path,
    *,
    legacy_normalization: bool = False,
    images: Collection[str] | None = None,
) -> dict:
    """Official VQA v2 accuracy of a predictions file (`vqa_question_accuracy`: the official file as it
    stands, or with `legacy_normalization` as it was before 2021).

    questions: `{"questions": [{"question_id", "image_id", "question"}, ...]}`; annotations:
    `{"annotations": [{"question_id", "answer_type", "question_type", "answers": [{"answer", ...}]}]}`;
    predictions: `[{"question_id": int, "answer": str}, ...]`, exactly one per question.
    Returns `{"accuracy", "per_answer_type": {type: accuracy}, "num_questions"}`, accuracies in percent
    rounded to 2 decimals. Questions are averaged in annotation-file order, as upstream.

    Per answer type, this is the mean of the per-question accuracies of that type. (The official file
    did the same since Sep 2015; its earlier state averaged the last leave-one-out score, a bug.)
    With `images` (file stems, COCO_val2014_000000000042), only the questions on those images are
    scored and predicted (a held-out part of a split, such as LXMERT's minival).
    """
    questions_path, annotations_path = Path(questions_path), Path(annotations_path)
    predictions_path = Path(predictions_path)
    question_ids = _vqa_question_ids(questions_path)

    annotations = _require_key_list(read_json(annotations_path), "annotations", annotations_path)
    gt_fields = {"question_id": int, "answer_type": str, "question_type": str, "answers": list}
    for i, annotation in enumerate(annotations):
        where = f"annotation entry {i}"
        _require_fields(annotation, gt_fields, annotations_path, where)
        if not annotation["answers"]:
            raise InputError(f"{where} has an empty answers list", annotations_path)
        for j, answer in enumerate(annotation["answers"]):
            _require_fields(answer, {"answer": str}, annotations_path, f"{where} answer {j}")
    annotated_ids = [annotation["question_id"] for annotation in annotations]
    _unique_ids(annotated_ids, annotations_path, "annotation entry", "question_id")
    question_id_set = set(question_ids)
    for i, question_id in enumerate(annotated_ids):
        if question_id not in question_id_set:
            raise InputError(
                f"annotation entry {i} names question_id {question_id} which is not in {questions_path.name}",
                annotations_path,
            )
    annotated_set = set(annotated_ids)
    for question_id in question_ids:
        if question_id not in annotated_set:
            raise InputError(f"question {question_id} has no annotation", annotations_path)

    if images is not None:
        scored = {q.question_id for q in load_vqa(questions_path) if q.img_id in images}
        question_ids = [question_id for question_id in question_ids if question_id in scored]
        annotations = [annotation for annotation in annotations if annotation["question_id"] in scored]
        if not question_ids:
            raise InputError("no question is on one of the images to score", questions_path)
    answer_by_question = _vqa_predictions(predictions_path, question_ids, questions_path)

    accuracies: list[float] = []
    accuracies_by_type: dict[str, list[float]] = {}
    for annotation in annotations:
        accuracy = vqa_question_accuracy(
            answer_by_question[annotation["question_id"]], [a["answer"] for a in annotation["answers"]],
            legacy_normalization=legacy_normalization,
        )
        accuracies.append(accuracy)
        accuracies_by_type.setdefault(annotation["answer_type"], []).append(accuracy)
    return {
        "accuracy": _percent(sum(accuracies), len(accuracies)),
        "per_answer_type": {
            answer_type: _percent(sum(values), len(values))
            for answer_type, values in accuracies_by_type.items()
        },
        "num_questions": len(accuracies),
    }


# ---------------------------------------------------------------------------------------------------
# GQA
# ---------------------------------------------------------------------------------------------------


def _gqa_questions(questions_path: Path) -> dict:
    questions = read_json(questions_path)
    if not isinstance(questions, dict):
        raise InputError(
            f"expected a JSON object mapping question ids to questions, got {type(questions).__name__}",
            questions_path,
        )
    if not questions:
        raise InputError("holds no questions", questions_path)
    return questions


def _gqa_predictions(predictions_path: Path, question_ids: list[str], questions_path: Path) -> dict[str, str]:
    return _question_predictions(predictions_path, question_ids, questions_path, ("questionId", str), "prediction")


def check_gqa_predictions(questions_path: str | Path, predictions_path: str | Path) -> dict:
    """The local check of a GQA submission file (testdev, challenge, submission_all: the server takes
    one file for all of them), as `check_vqa_predictions`."""
    questions_path, predictions_path = Path(questions_path), Path(predictions_path)
    question_ids = list(_gqa_questions(questions_path))
    _gqa_predictions(predictions_path, question_ids, questions_path)
    return {"num_questions": len(question_ids)}


def evaluate_gqa(questions_path: str | Path, predictions_path: str | Path) -> dict:
    """GQA accuracy: exact string match of the prediction with the question's answer.

    questions: `{question_id: {"imageId", "question", "answer", ...}}` (e.g. the balanced split);
    predictions: `[{"questionId": str, "prediction": str}, ...]`, exactly one per question.
    Returns `{"accuracy", "num_questions"}`, accuracy in percent rounded to 2 decimals.
    """
    questions_path, predictions_path = Path(questions_path), Path(predictions_path)
    gold_by_question = {}
    for question_id, question in _gqa_questions(questions_path).items():
        _require_fields(question, {"answer": str}, questions_path, f"question {question_id}")
        gold_by_question[question_id] = question["answer"]
    prediction_by_question = _gqa_predictions(predictions_path, list(gold_by_question), questions_path)
    correct = sum(prediction_by_question[qid] == gold for qid, gold in gold_by_question.items())
    return {"accuracy": _percent(correct, len(gold_by_question)), "num_questions": len(gold_by_question)}


# ---------------------------------------------------------------------------------------------------
# NLVR2
# ---------------------------------------------------------------------------------------------------

_NLVR2_LABELS = ("true", "false")
_NLVR2_HEADER = "identifier,prediction"


def _nlvr2_sentence_key(identifier: str) -> str:
    """`dev-850-0-0` -> `dev-850--0`: the example's sentence (split-set-*-sentence), pair blanked."""
    fields = identifier.split("-")
    fields[2] = ""
    return "-".join(fields)


def _nlvr2_examples(data_path: Path, *, labelled: bool) -> dict[str, str | None]:
    """identifier -> lowercased label ("true"/"false"; None when not `labelled`: NLVR2's hidden test)."""
    label_by_example: dict[str, str | None] = {}
    for line_number, line in enumerate(read_text_lines(data_path), start=1):
        if not line.strip():
            continue
        where = f"line {line_number}"
        try:
            example = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{where} is not valid JSON ({err})", data_path) from None
        _require_fields(example, {"identifier": str, **({"label": str} if labelled else {})}, data_path, where)
        identifier, label = example["identifier"], example.get("label") if labelled else None
        if len(identifier.split("-")) != 4:
            raise InputError(
                f"{where} has identifier {identifier!r}, expected split-set-pair-sentence", data_path
            )
        if labelled and label.lower() not in _NLVR2_LABELS:
            raise InputError(f'{where} has label {label!r}, expected "True" or "False"', data_path)
        if identifier in label_by_example:
            raise InputError(f"{where} repeats identifier {identifier!r}", data_path)
        label_by_example[identifier] = label.lower() if labelled else None
    if not label_by_example:
        raise InputError("holds no examples", data_path)
    return label_by_example


def _nlvr2_predictions(predictions_path: Path, identifiers: list[str], data_path: Path) -> dict[str, str]:
    """The predictions CSV (`identifier,True|False` lines, optional header), checked to predict every
    example once."""
    lines = read_text_lines(predictions_path)
    first_line = 1
    if lines and lines[0].strip().lower() == _NLVR2_HEADER:
        first_line = 2
    predicted: list[tuple[str, str, str]] = []
    for line_number, line in enumerate(lines[first_line - 1:], start=first_line):
        if not line.strip():
            continue
        fields = line.strip().split(",")
        if len(fields) != 2 or not fields[0] or fields[1].lower() not in _NLVR2_LABELS:
            raise InputError(
                f"line {line_number} is {line!r}, expected identifier,True or identifier,False",
                predictions_path,
            )
        predicted.append((f"line {line_number}", fields[0], fields[1].lower()))
    return _match_predictions(predicted, identifiers, predictions_path, data_path, "identifier", "example")


def check_nlvr2_predictions(data_path: str | Path, predictions_path: str | Path) -> dict:
    """The local check of an NLVR2 predictions file for a split without labels, as
    `check_vqa_predictions`. Returns `{"num_examples"}`."""
    data_path, predictions_path = Path(data_path), Path(predictions_path)
    identifiers = list(_nlvr2_examples(data_path, labelled=False))
    _nlvr2_predictions(predictions_path, identifiers, data_path)
    return {"num_examples": len(identifiers)}


def evaluate_nlvr2(data_path: str | Path, predictions_path: str | Path) -> dict:
    """NLVR2 accuracy and consistency, as the official `nlvr2/eval/metrics.py` computes them.

    data: jsonl, one example per line with `identifier` (`split-set-pair-sentence`, e.g. `dev-850-0-0`)
    and `label` ("True"/"False"). predictions: CSV lines `identifier,True|False`, no header (an optional
    first line `identifier,prediction` is accepted); labels compare case-insensitively, as upstream.
    Consistency is the share of sentences (identifier with the pair field blanked) whose examples are
    all predicted correctly. Returns `{"accuracy", "consistency", "num_examples"}`, percent, 2 decimals.
    """
    data_path, predictions_path = Path(data_path), Path(predictions_path)
    label_by_example = _nlvr2_examples(data_path, labelled=True)
    prediction_by_example = _nlvr2_predictions(predictions_path, list(label_by_example), data_path)

    correct = 0
    sentence_consistent: dict[str, bool] = {}
    for identifier, label in label_by_example.items():
        is_correct = prediction_by_example[identifier] == label
        correct += is_correct
        key = _nlvr2_sentence_key(identifier)
        sentence_consistent[key] = sentence_consistent.get(key, True) and is_correct
    return {
        "accuracy": _percent(correct, len(label_by_example)),
        "consistency": _percent(sum(sentence_consistent.values()), len(sentence_consistent)),
        "num_examples": len(label_by_example),
    }


# ---------------------------------------------------------------------------------------------------
# Retrieval (Flickr30K)
# ---------------------------------------------------------------------------------------------------


def _stable_descending_ranks(scores: np.ndarray, axis: int) -> np.ndarray:
    """0-based rank of every entry among its row (axis=1) or column (axis=0), best first.

    Ties are broken by index: the rank of an entry is the number of candidates with a strictly higher
    score plus the number with an equal score and a smaller index (a stable sort by descending score).
    Deterministic, and neither optimistic nor pessimistic about ties as a whole.
    """
    # Negating keeps ties exact (-x == -y iff x == y), so a stable ascending sort on it is what we want.
    order = np.argsort(-scores, axis=axis, kind="stable")  # same shape as scores
    ranks = np.empty_like(order)
    positions = np.arange(scores.shape[axis]).reshape((-1, 1) if axis == 0 else (1, -1))
    np.put_along_axis(ranks, order, np.broadcast_to(positions, order.shape), axis=axis)
    return ranks


def retrieval_ranks(scores: np.ndarray, caption_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of the right answer: of each caption's image in its row (num_captions,), and of
    each image's best-ranked caption in its column (num_images,).

    scores: (num_captions, num_images), higher = more similar. caption_image: (num_captions,), the
    index of each caption's image; every image must have at least one caption.
    Ties are broken by index (see `_stable_descending_ranks`).
    """
    scores = np.asarray(scores)
    caption_image = np.asarray(caption_image)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a 2-d (num_captions, num_images) array, got shape {scores.shape}")
    num_captions, num_images = scores.shape
    if caption_image.shape != (num_captions,) or not np.issubdtype(caption_image.dtype, np.integer):
        raise ValueError(
            f"caption_image must be an integer array of shape ({num_captions},), "
            f"got {caption_image.dtype} {caption_image.shape}"
        )
    if num_captions == 0 or caption_image.min() < 0 or caption_image.max() >= num_images:
        raise ValueError(f"caption_image must hold image indices in [0, {num_images})")
    captions_per_image = np.bincount(caption_image, minlength=num_images)  # (num_images,)
    if (captions_per_image == 0).any():
        raise ValueError(f"image {int(np.argmin(captions_per_image))} has no caption")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")

    caption_rows = np.arange(num_captions)
    # Text->image: rank of each caption's own image within its row.
    image_rank = _stable_descending_ranks(scores, axis=1)[caption_rows, caption_image]  # (num_captions,)
    # Image->text: per column, the best rank of any of that image's captions.
    caption_rank = _stable_descending_ranks(scores, axis=0)[caption_rows, caption_image]  # (num_captions,)
    best_caption_rank = np.full(num_images, num_captions)
    np.minimum.at(best_caption_rank, caption_image, caption_rank)  # (num_images,)

    return image_rank, best_caption_rank


def retrieval_recalls(scores: np.ndarray, caption_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@K of image-text retrieval in both directions, in percent (not rounded).

    scores: (num_captions, num_images), higher = more similar. caption_image: (num_captions,), the
    index of each caption's image; every image must have at least one caption.
    Text->image (`ir_r{k}`): a caption's query is a hit when its image ranks in the top k of its row.
    Image->text (`tr_r{k}`): an image's query is a hit when any of its captions ranks in the top k of
    its column. `rsum` is the sum of all.
    """
    image_rank, best_caption_rank = retrieval_ranks(scores, caption_image)
    recalls: dict[str, float] = {}
    for k in ks:
        recalls[f"ir_r{k}"] = 100.0 * float(np.mean(image_rank < k))
    for k in ks:
        recalls[f"tr_r{k}"] = 100.0 * float(np.mean(best_caption_rank < k))
    recalls["rsum"] = sum(recalls.values())
    return recalls


def read_retrieval_scores(dataset_path: str | Path, split: str, scores_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A score matrix over one Karpathy split, checked against the split, and its caption -> image index.

    dataset: Karpathy `dataset_flickr30k.json` (`{"images": [{"filename", "split", "sentences"}]}`).
    The split's images are taken in file order, and its captions image by image, sentence by sentence.
    scores: a `.npy` array (num_captions, num_images) for that split, higher = more similar.
    """
    dataset_path, scores_path = Path(dataset_path), Path(scores_path)
    images = _require_key_list(read_json(dataset_path), "images", dataset_path)
    caption_image_list: list[int] = []
    num_images = 0
    for i, image in enumerate(images):
        _require_fields(image, {"split": str, "sentences": list}, dataset_path, f"image entry {i}")
        if image["split"] != split:
            continue
        if not image["sentences"]:
            raise InputError(f"image entry {i} has no sentences", dataset_path)
        caption_image_list.extend([num_images] * len(image["sentences"]))
        num_images += 1
    if num_images == 0:
        raise InputError(f"has no images in split {split!r}", dataset_path)
    caption_image = np.asarray(caption_image_list, dtype=np.int64)  # (num_captions,)

    if not scores_path.is_file():
        raise InputError("file not found", scores_path)
    try:
        scores = np.load(scores_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"not a readable .npy array ({err})", scores_path) from None
    if not isinstance(scores, np.ndarray):
        raise InputError("expected a single .npy array, got an archive", scores_path)
    if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
        raise InputError(f"scores must be real numbers, got dtype {scores.dtype}", scores_path)
    expected_shape = (len(caption_image), num_images)
    if scores.shape != expected_shape:
        raise InputError(
            f"score matrix has shape {scores.shape}, expected {expected_shape} "
            f"(captions x images of split {split!r} in {dataset_path.name})",
            scores_path,
        )
    nan_positions = np.argwhere(np.isnan(scores)) if np.issubdtype(scores.dtype, np.floating) else []
    if len(nan_positions):
        caption, image = (int(v) for v in nan_positions[0])
        raise InputError(f"score [{caption}, {image}] is NaN", scores_path)
    return scores, caption_image


def evaluate_retrieval(dataset_path: str | Path, split: str, scores_path: str | Path) -> dict:
    """Flickr30K retrieval recalls of a score matrix over one Karpathy split (`read_retrieval_scores`):
    R@1/5/10 both ways and `rsum` in percent rounded to 2 decimals, plus the counts."""
    scores, caption_image = read_retrieval_scores(dataset_path, split, scores_path)
    recalls = retrieval_recalls(scores, caption_image)
    result: dict[str, Any] = {name: _round_2(value) for name, value in recalls.items()}
    result["num_captions"], result["num_images"] = scores.shape
    return result
