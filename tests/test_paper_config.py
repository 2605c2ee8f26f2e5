"""The paper-scale config: missing official files stop the run with a list; with them the full DAG plans."""

from __future__ import annotations

import copy

import yaml
from snakemake.utils import update_config

from conftest import REPO, run_snakemake
from semvlp.config import validate_config
from semvlp.data.requirements import required_files
from test_workflow import job_counts

PAPER = str(REPO / "config" / "paper.yaml")


def paper_config() -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    update_config(config, yaml.safe_load((REPO / "config" / "paper.yaml").read_text()))
    return validate_config(copy.deepcopy(config))


def test_missing_files_stop_the_run_with_the_list_and_where_to_get_them(tmp_path):
    result = run_snakemake(tmp_path, "results/all.tsv", "-n", "--configfile", PAPER, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "input file(s) missing" in output
    assert "resources/vqa/v2_mscoco_train2014_annotations.json" in output and "visualqa.org" in output
    # the paper's further corpora, each file once, and the image folders the web captions need
    for path in ("vg/region_descriptions.json", "vg/question_answers.json", "vg/image_data.json", "vg/images",
                 "gqa/images", "cc/Train_GCC-training.tsv", "cc/images", "sbu/SBU_captioned_photo_dataset_urls.txt"):
        assert output.count(f"resources/{path} ") == 1, path
    assert "img2dataset's default keys" in output
    # the files the config names itself: one line each, naming the key
    assert "config key 'model.init': resources/models/bert-base-uncased: no such directory" in output
    assert "config key 'regions.detectron2.weights': resources/models/faster_rcnn_from_caffe_attr.pkl: no such file" in output
    assert "config key 'finetune.tasks.vqa.held_out_images': resources/vqa/lxmert_minival.json: no such file" in output
    # the test-server splits: questions only
    assert "resources/vqa/v2_OpenEnded_mscoco_test-dev2015_questions.json" in output
    assert "v2_mscoco_test-dev2015_annotations" not in output and "resources/gqa/submission_all_questions.json" in output
    assert "Job stats" not in output and not (tmp_path / "results").exists()


def write_placeholder_files(workdir) -> None:
    """Every file and folder the paper config reads, as placeholders under `workdir` (enough to plan)."""
    config = paper_config()
    for path, _ in required_files(config):
        target = workdir / path
        if path.suffix:  # a file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("placeholder\n")
        else:  # an image folder
            target.mkdir(parents=True, exist_ok=True)
    # the BERT checkpoint and the detector files the config names (semvlp.config.path_problems)
    bert = workdir / config["model"]["init"]
    bert.mkdir(parents=True)
    for name in ("config.json", "vocab.txt", "model.safetensors"):
        (bert / name).write_text("placeholder\n")
    for key in ("config_file", "weights"):
        (workdir / config["regions"]["detectron2"][key]).write_text("placeholder\n")
    (workdir / config["finetune"]["tasks"]["vqa"]["held_out_images"]).write_text("placeholder\n")


def test_paper_config_plans_the_full_dag_with_placeholder_files(tmp_path):
    write_placeholder_files(tmp_path)
    result = run_snakemake(tmp_path, "results/all.tsv", "-n", "--configfile", PAPER, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    counts = job_counts(result.stdout)
    assert counts["extract_regions"] == 6 * 32  # coco, vg (with GQA's images), nlvr2, flickr30k, cc, sbu
    assert counts["index_regions"] == 6
    assert counts["pretrain_phase"] == 3 * 4  # semvlp, single_only, two_only: 4 phases each; none: 0
    assert counts["init_model"] == 4
    assert counts["finetune"] == 4 * 4 * 3  # variants x tasks x seeds
    assert "train_tokenizer" not in counts and "train_detector" not in counts and "generate_world" not in counts
    # the cluster resources of the config reach the jobs
    assert "gpu=8" in result.stdout and "runtime=4320" in result.stdout
