"""Test-server files: splits without answers get the server's format, checked locally, no metric;
`semvlp evaluate --check-only` refuses a file with a missing or repeated id."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, task_config
from semvlp.data import layout
from semvlp.tasks import TASKS
from semvlp.data.formats import load_vqa
from semvlp.metrics import check_gqa_predictions, check_nlvr2_predictions, check_vqa_predictions
from semvlp.errors import InputError

FIXTURES = Path(__file__).parent / "fixtures" / "formats"


def _semvlp(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "semvlp"), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_vqa_test_dev_questions_name_the_test2015_images(tmp_path):
    """test-dev2015 is a subset of test2015: its images are COCO_test2015_*."""
    data = json.loads((FIXTURES / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    data["data_subtype"] = "test-dev2015"
    path = tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    path.write_text(json.dumps(data))
    assert {q.img_id for q in load_vqa(path)} == {"COCO_test2015_000000000042", "COCO_test2015_000000000073"}
    assert "test-dev2015_annotations" not in TASKS["vqa"].files(tmp_path, {**task_config("vqa"), "eval_splits": ["test-dev2015"]})


@pytest.mark.parametrize("change, message", [
    (lambda entries: entries.pop(), "question 73000 has no prediction"),
    (lambda entries: entries.append(dict(entries[0])), "entry 3 repeats question_id 42000"),
    (lambda entries: entries[1].update(answer=2), 'entry 1 has "answer" = 2; expected str'),
    (lambda entries: entries[1].update(question_id=99), "entry 1 names question_id 99 which is not in"),
])
def test_vqa_check_refuses_a_broken_server_file(tmp_path, change, message):
    questions = FIXTURES / "v2_OpenEnded_mscoco_val2014_questions.json"
    ids = [q["question_id"] for q in json.loads(questions.read_text())["questions"]]
    entries = [{"question_id": i, "answer": "yes"} for i in ids]
    path = tmp_path / "predictions.json"
    path.write_text(json.dumps(entries))
    assert check_vqa_predictions(questions, path) == {"num_questions": len(ids)}
    change(entries)
    path.write_text(json.dumps(entries))
    with pytest.raises(InputError, match=message):
        check_vqa_predictions(questions, path)


# ------------------------------------------------------- on the tiny run's saved models, end to end


def _unlabelled_root(results: Path, tmp_path: Path) -> Path:
    """Test splits without answers next to the tiny run's data: VQA test2015 (the val2014 questions
    without annotations, so the run's features hold their images), GQA challenge, NLVR2 test2."""
    data = next(p for p in (results / "data").iterdir() if p.is_dir())
    root = tmp_path / "root"
    vqa = json.loads(layout.vqa_questions(data, "val2014").read_text())
    _write(layout.vqa_questions(root, "test2015"), json.dumps(vqa))
    gqa = json.loads(layout.gqa_questions(data, "val").read_text())
    _write(layout.gqa_questions(root, "challenge"), json.dumps({k: {f: v for f, v in q.items() if f not in ("answer", "fullAnswer")} for k, q in gqa.items()}))
    lines = [json.loads(line) for line in layout.nlvr2_data(data, "dev").read_text().splitlines()]
    _write(layout.nlvr2_data(root, "test2"), "".join(json.dumps({k: v for k, v in e.items() if k != "label"}) + "\n" for e in lines))
    return root


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("task, split, image_set, predictions, check", [
    ("vqa", "test2015", "coco", "predictions_test2015.json", ["--questions", "{root}/vqa/v2_OpenEnded_mscoco_test2015_questions.json"]),
    ("gqa", "challenge", "vg", "predictions_challenge.json", ["--questions", "{root}/gqa/challenge_balanced_questions.json"]),
    ("nlvr2", "test2", "nlvr2", "predictions_test2.csv", ["--data", "{root}/nlvr2/test2.json"]),
])
def test_a_split_without_answers_gets_a_checked_server_file_and_no_metric(tiny_run, tmp_path, task, split, image_set, predictions, check):
    results = tiny_run.workdir / "results"
    root = _unlabelled_root(results, tmp_path)
    out = tmp_path / "out"
    result = _semvlp(
        "predict", task, "--model", str(results / "finetune" / "semvlp" / task / "seed0" / "model"), "--data-root", str(root),
        "--split", split, "--features", str(results / "features" / f"{image_set}.h5"), "--out", str(out), "--evaluate",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    counted = outcome["results"]
    assert set(counted) <= {"num_questions", "num_examples"} and list(counted.values())[0] > 0  # checked, not scored
    path = out / predictions
    if task == "vqa":
        entries = json.loads(path.read_text())
        assert all(set(e) == {"question_id", "answer"} and isinstance(e["question_id"], int) and isinstance(e["answer"], str) for e in entries)
    elif task == "gqa":
        entries = json.loads(path.read_text())
        assert all(set(e) == {"questionId", "prediction"} and isinstance(e["questionId"], str) for e in entries)
    else:
        entries = path.read_text().splitlines()
        assert all(line.rsplit(",", 1)[1] in ("True", "False") for line in entries)

    check_args = [arg.format(root=root) for arg in check]
    ok = _semvlp("evaluate", task, *check_args, "--predictions", str(path), "--check-only")
    assert ok.returncode == 0 and json.loads(ok.stdout)["valid"] is True
    for broken, words in ((entries[1:], "has no prediction"), (entries + entries[:1], "repeats")):
        bad = tmp_path / f"bad{path.suffix}"
        bad.write_text(json.dumps(broken) if path.suffix == ".json" else "\n".join(broken) + "\n")
        refused = _semvlp("evaluate", task, *check_args, "--predictions", str(bad), "--check-only")
        assert refused.returncode == 2 and words in refused.stderr and str(bad) in refused.stderr


def test_the_checks_need_no_labels(tmp_path):
    gqa = json.loads((FIXTURES / "val_balanced_questions.json").read_text())
    questions = tmp_path / "submission_all_questions.json"
    questions.write_text(json.dumps({k: {"imageId": q["imageId"], "question": q["question"]} for k, q in gqa.items()}))
    predictions = tmp_path / "p.json"
    predictions.write_text(json.dumps([{"questionId": k, "prediction": "yes"} for k in gqa]))
    assert check_gqa_predictions(questions, predictions) == {"num_questions": len(gqa)}
    assert layout.gqa_questions(tmp_path, "submission").name == "submission_all_questions.json"
    data = tmp_path / "test2.json"
    data.write_text('{"identifier": "test2-0-0-0", "sentence": "s"}\n{"identifier": "test2-0-1-0", "sentence": "s"}\n')
    csv = tmp_path / "p.csv"
    csv.write_text("test2-0-0-0,True\ntest2-0-1-0,False\n")
    assert check_nlvr2_predictions(data, csv) == {"num_examples": 2}
    (tmp_path / "q.csv").write_text("test2-0-0-0,True\n")
    with pytest.raises(InputError, match='example "test2-0-1-0" has no prediction'):
        check_nlvr2_predictions(data, tmp_path / "q.csv")
