"""The anchors' fine-tuning recipes: several training splits, a held-out image list (LXMERT's minival),
Visual Genome's QAs as extra VQA training data; and the task interface the workflow plans from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import TINY, run_snakemake, task_config
from semvlp.config import ConfigError, validate_config
from semvlp.data import layout
from semvlp.data.formats import load_vqa
from semvlp.errors import InputError
from semvlp.metrics import evaluate_vqa
from semvlp.tasks import TASKS, VQASettings

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
REPO = Path(__file__).resolve().parent.parent


def vqa_task(files: dict, **values):
    """The VQA task over `files`, without features or a tokenizer (enough to build its examples)."""
    settings = VQASettings.from_config(task_config("vqa", **values), seed=0, max_text_length=20)
    return TASKS["vqa"].implementation()(settings, files, None, None)


def _vqa_split(root: Path, split: str, answers: dict[int, list[str]]) -> None:
    """A VQA split in the official layout: one question per image id, annotated with `answers`."""
    questions = [{"image_id": image, "question": f"Question {image}?", "question_id": image * 10} for image in answers]
    annotations = [
        {"question_id": image * 10, "image_id": image, "question_type": "what", "answer_type": "other",
         "multiple_choice_answer": given[0], "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(given * 10)][:10]}
        for image, given in answers.items()
    ]
    for path, body in ((layout.vqa_questions(root, split), {"data_subtype": split, "questions": questions}),
                       (layout.vqa_annotations(root, split), {"data_subtype": split, "annotations": annotations})):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(body))


def test_vg_qa_adds_the_qas_off_the_evaluation_images_whose_answer_is_in_the_table(tmp_path):
    """Fixture VG: image 10 is COCO 42, an evaluation image (its "Red." is left out); image 12 is COCO 9
    ("Clouds.", "One." kept: normalised to answers of the table); "A horse." is no answer of the table."""
    root = tmp_path / "root"
    shutil.copytree(FIXTURES / "vg", root / "vg")
    _vqa_split(root, "train2014", {1: ["red"], 2: ["clouds"], 3: ["1"]})
    shutil.copy(FIXTURES / "v2_OpenEnded_mscoco_val2014_questions.json", layout.vqa_questions(root, "val2014"))
    shutil.copy(FIXTURES / "v2_mscoco_val2014_annotations.json", layout.vqa_annotations(root, "val2014"))
    section = task_config("vqa", train_splits=["train2014"], eval_splits=["val2014"], min_answer_count=1, vg_qa=True)
    task = vqa_task(TASKS["vqa"].files(root, section), **section)
    examples, recorded = task.training_examples()
    vg = [e for e in examples if e.image_set == "vg"]
    assert [(e.img_id, e.question) for e in vg] == [("12", "What is in the sky?"), ("12", "How many lamp posts are there?")]
    answers = recorded["answers"]
    assert [answers[e.answer_indices[0]] for e in vg] == ["clouds", "1"] and all(e.scores.tolist() == [1.0] for e in vg)
    assert recorded["vg_qa_examples"] == 2 and len(examples) == 3 + 2
    assert TASKS["vqa"].image_sets(section) == ["coco", "vg"]


def test_a_held_out_list_naming_no_training_image_is_refused_naming_the_file(tmp_path):
    root = tmp_path / "root"
    _vqa_split(root, "train2014", {1: ["red"], 2: ["blue"]})
    listed = tmp_path / "minival.txt"
    listed.write_text("# LXMERT's minival, as image ids\nCOCO_train2014_000000000001\n42\n")
    task = vqa_task(TASKS["vqa"].files(root, task_config("vqa", train_splits=["train2014"])),
                    train_splits=["train2014"], held_out_images=str(listed), min_answer_count=1)
    with pytest.raises(InputError) as error:
        task.training_examples()
    assert str(error.value).startswith(f"{listed}: 1 held-out images are in no training split (train2014), e.g. '42'")


def test_lxmerts_minival_json_is_read_as_its_images(tmp_path):
    from semvlp.tasks.vqa import read_image_list

    minival = tmp_path / "minival.json"
    minival.write_text(json.dumps([{"img_id": "COCO_val2014_000000000042", "sent": "What?", "question_id": 1},
                                   {"img_id": "COCO_val2014_000000000042", "sent": "Who?", "question_id": 2}]))
    assert read_image_list(minival) == {"COCO_val2014_000000000042"}
    minival.write_text(json.dumps([{"sent": "What?"}]))
    with pytest.raises(InputError, match="LXMERT's minival.json"):
        read_image_list(minival)


def test_vqa_accuracy_over_held_out_images_scores_their_questions_only(tmp_path):
    questions, annotations = FIXTURES / "v2_OpenEnded_mscoco_val2014_questions.json", FIXTURES / "v2_mscoco_val2014_annotations.json"
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps([{"question_id": 73000, "answer": "yes"}]))
    result = evaluate_vqa(questions, annotations, predictions, images={"COCO_val2014_000000000073"})
    assert result["num_questions"] == 1
    whole = tmp_path / "whole.json"
    whole.write_text(json.dumps([{"question_id": q.question_id, "answer": "yes"} for q in load_vqa(questions)]))
    assert evaluate_vqa(questions, annotations, whole)["num_questions"] == 3
    predictions.write_text("[]")
    with pytest.raises(InputError, match="question 73000 has no prediction"):  # a held-out question left out
        evaluate_vqa(questions, annotations, predictions, images={"COCO_val2014_000000000073"})


# ------------------------------------------------------------------------------- config and planning


def _default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t["gqa"].update(train_splits=["train", "val"]),
         "config key 'finetune.tasks.gqa.eval_splits.0': 'val' is also in train_splits, so it would be evaluated on what it trained on"),
        (lambda t: t["vqa"].update(train_splits=["train2014", "val2014"]),
         "config key 'finetune.tasks.vqa.eval_splits.0': 'val2014' is also in train_splits, so it would be evaluated on what it "
         "trained on; name held_out_images to score it on those only"),
        (lambda t: t["vqa"].update(vg_qa=True), "config key 'finetune.tasks.vqa': reads image set 'vg', which regions.image_sets does not list"),
        (lambda t: t["nlvr2"].update(train_split="train"),
         "config key 'finetune.tasks.nlvr2.train_split': unknown key (renamed to train_splits, a list of splits trained on together)"),
        (lambda t: t["retrieval"].update(train_splits=["train", "train"]), "config key 'finetune.tasks.retrieval.train_splits'"),
    ],
    ids=["eval-in-train", "vqa-eval-in-train", "vg-qa-without-vg", "renamed-key", "repeated-split"],
)
def test_a_recipe_the_tasks_cannot_run_is_refused_naming_the_key(change, message):
    config = _default_config()
    change(config["finetune"]["tasks"])
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    assert str(error.value).startswith(message)


def test_a_missing_held_out_list_stops_the_run_before_any_job(tmp_path):
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(
        {"finetune": {"tasks": {"vqa": {"train_splits": ["train2014", "val2014"], "held_out_images": "lists/minival.txt"}}}}
    ))
    result = run_snakemake(tmp_path, "results/all.tsv", "-n", "--configfile", str(tmp_path / "override.yaml"), timeout=120)
    assert result.returncode != 0
    assert "config key 'finetune.tasks.vqa.held_out_images': lists/minival.txt: no such file" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_vqa_trains_on_two_splits_minus_the_held_out_images_and_is_scored_on_those(tiny_run, tmp_path):
    """LXMERT's recipe on the embedded world, through the workflow: VQA fine-tunes on train2014 and the
    val2014 questions off a held-out image list, and val2014 is scored on the held-out images only.
    A copy of the tiny run reruns only its VQA fine-tunings (their settings changed)."""
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run.workdir, workdir, symlinks=True)  # copytree keeps the files' times: nothing else reruns
    root = next(p for p in (workdir / "results" / "data").iterdir() if p.is_dir())
    val = load_vqa(layout.vqa_questions(root, "val2014"))
    val_images = sorted({q.img_id for q in val})
    held_out = set(val_images[: len(val_images) // 2])
    listed = tmp_path / "minival.txt"
    listed.write_text("".join(f"{image}\n" for image in sorted(held_out)))
    recipe = {"train_splits": ["train2014", "val2014"], "eval_splits": ["val2014"], "held_out_images": str(listed)}
    override = tmp_path / "recipe.yaml"
    override.write_text(yaml.safe_dump({"finetune": {"tasks": {"vqa": recipe}}}))
    result = run_snakemake(workdir, "results/all.tsv", "--cores", "2", "--configfile", TINY, str(override), timeout=1200)
    assert result.returncode == 0, result.stderr[-5000:]
    rerun = {line.split("rule ")[1].rstrip(":") for line in result.stdout.splitlines() + result.stderr.splitlines() if line.startswith("rule ")}
    assert rerun <= {"finetune", "report"}, rerun

    job = workdir / "results" / "finetune" / "semvlp" / "vqa" / "seed0"
    held_out_questions = {q.question_id for q in val if q.img_id in held_out}
    predicted = {entry["question_id"] for entry in json.loads((job / "predictions_val2014.json").read_text())}
    assert predicted == held_out_questions
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["results"]["val2014"]["num_questions"] == len(held_out_questions)
    info = json.loads((job / "model" / "task.json").read_text())
    train = load_vqa(layout.vqa_questions(root, "train2014"))
    assert info["trained_on"]["splits"] == ["train2014", "val2014"]
    assert info["questions_by_split"] == {"train2014": len(train), "val2014": len(val) - len(held_out_questions)}
    assert info["held_out_images"] == len(held_out)
    # what it trained on, built again the way the job built it: no question on a held-out image
    section = {**task_config("vqa", min_answer_count=1), **recipe}
    examples, _ = vqa_task(TASKS["vqa"].files(root, section), **section).training_examples()
    assert not {e.img_id for e in examples} & held_out
    assert {e.img_id for e in examples} & (set(val_images) - held_out)  # the rest of val2014 is trained on
