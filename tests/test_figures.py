"""Figures are drawn from the run's own numbers; the Snakemake report holds them and opens in a browser."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TINY, run_snakemake
from semvlp.errors import InputError
from semvlp.features import FeatureReader
from semvlp.figures import detections_figure, finetuning_figure, pretraining_figure, results_figure

ARTIFACTS = REPO / "tests" / "artifacts"


def test_the_plotted_loss_curves_are_the_phases_histories(tiny_run):
    """Every term's line of a phase is that phase's history, at steps offset by the phases before it."""
    pretrain = tiny_run.workdir / "results" / "pretrain" / "semvlp"
    paths = sorted(pretrain.glob("phase*.metrics.json"))
    histories = [json.loads(path.read_text())["history"] for path in paths]
    figure = pretraining_figure("semvlp", paths)
    panels = {ax.get_title(): ax for ax in figure.axes if ax.get_visible()}
    assert {"loss_total", "loss_mlm", "loss_itm", "itm_accuracy"} <= set(panels)
    for term, ax in panels.items():
        curves = [line for line in ax.lines if line.get_label().startswith("phase ")]  # not the boundaries
        assert len(curves) == len(histories)
        offset = 0
        for line, history in zip(curves, histories):
            assert line.get_xdata().tolist() == [offset + entry["step"] for entry in history]
            assert np.array_equal(line.get_ydata(), [entry[term] for entry in history], equal_nan=True), term
            offset += len(history)


def test_the_fine_tuning_curves_are_the_jobs_loss_histories(tiny_run):
    metrics = sorted((tiny_run.workdir / "results" / "finetune").rglob("metrics.json"))
    figure = finetuning_figure(metrics)
    drawn = {(ax.get_title().split()[0], line.get_label()): line.get_ydata().tolist() for ax in figure.axes for line in ax.lines}
    for path in metrics:
        record = json.loads(path.read_text())
        key = (record["task"], f"{record['variant']} seed {record['seed']}")
        assert drawn[key] == record["train"]["loss_history"] and len(drawn[key]) > 0


def test_the_boxes_drawn_are_the_feature_stores_boxes(tiny_run):
    results = tiny_run.workdir / "results"
    store = results / "features" / "coco.h5"
    image_dirs = [next((results / "data").iterdir()) / "coco" / "images"]
    figure = detections_figure({"coco": store}, {"coco": image_dirs}, per_set=2)
    reader = FeatureReader(store)
    for ax, img_id in zip(figure.axes, reader.ids[:2]):
        assert ax.get_title() == f"coco: {img_id}"
        drawn = [(r.get_x(), r.get_y(), r.get_x() + r.get_width(), r.get_y() + r.get_height()) for r in ax.patches]
        record = reader.get(img_id)
        assert np.allclose(drawn, record.boxes.astype(np.float64)) and len(drawn) == record.num_boxes
        labels = [text.get_text() for text in ax.texts]
        categories = reader.provenance["detector"]["categories"]
        assert labels[0].startswith(f"{categories[record.obj_ids[0]]} {record.obj_confs[0]:.2f}")


def test_the_results_figure_shows_each_variants_mean_and_spread_over_seeds(tmp_path):
    tsv = tmp_path / "ablation.tsv"
    rows = ["variant\ttask\tsplit\tmetric\tseed\tvalue\trun_id"]
    rows += [f"{v}\tvqa\tval2014\taccuracy\t{s}\t{value}\tr" for v, values in (("semvlp", (60, 64)), ("none", (50, 52))) for s, value in enumerate(values)]
    tsv.write_text("\n".join(rows) + "\n")
    ax = results_figure(tsv, "ablation").axes[0]
    assert [bar.get_height() for bar in ax.patches] == [62.0, 51.0]
    spreads = [line.get_ydata() for line in ax.lines if len(line.get_ydata()) == 2 and line.get_linestyle() == "None"]
    assert [sorted(values.tolist()) for values in spreads] == [[60.0, 64.0], [50.0, 52.0]]  # each seed a dot


@pytest.mark.slow
def test_figures_are_logged_to_mlflow_beside_the_metrics_they_plot(tiny_run):
    """Each figure job's run holds its figures; the pre-training figures are also in the last phase's
    run and the detector's curve in the detector's, next to the metrics they plot."""
    from mlflow.tracking import MlflowClient

    results = tiny_run.workdir / "results"
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("semvlp-tiny")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)

    def figures_of(run_id: str, folder: str = "figures") -> set[str]:
        """The run's artifacts under `folder`, by path below it."""
        found = set()
        for artifact in client.list_artifacts(run_id, folder):
            if artifact.is_dir:
                found |= {f"{Path(artifact.path).name}/{name}" for name in figures_of(run_id, artifact.path)}
            else:
                found.add(Path(artifact.path).name)
        return found

    by_rule = {}
    for run in runs:
        by_rule.setdefault(run.data.tags.get("semvlp.rule"), []).append(run)
    assert figures_of(by_rule["figure_pretraining"][0].info.run_id) == {"pretraining/semvlp.png", "grounding/semvlp.png"}
    assert figures_of(by_rule["figure_vqa"][0].info.run_id) == {"vqa.png"}
    last_phase = (results / "pretrain" / "semvlp" / "phase2.safetensors.run_id").read_text().strip()
    assert figures_of(last_phase) == {"pretraining/semvlp.png", "grounding/semvlp.png"}
    assert "loss_mlm" in client.get_run(last_phase).data.metrics
    detector = (results / "detector" / "detector.pt.run_id").read_text().strip()
    assert figures_of(detector) == {"detector.png"} and "loss" in client.get_run(detector).data.metrics
    report = by_rule["report"][0].info.run_id
    assert {"finetuning.png", "detections.png", "pretraining/semvlp.png"} <= figures_of(report)
    assert "results.png" in {Path(a.path).name for a in client.list_artifacts(report)}


@pytest.mark.parametrize("content, words", [("{not json", "not valid JSON"), ('{"summary": {}}', "no 'history'")])
def test_a_malformed_metrics_file_is_refused_naming_it(tmp_path, content, words):
    path = tmp_path / "phase1.metrics.json"
    path.write_text(content)
    with pytest.raises(InputError) as error:
        pretraining_figure("semvlp", [path])
    assert str(error.value).startswith(str(path)) and words in str(error.value)


def test_a_results_table_without_its_columns_is_refused_naming_it(tmp_path):
    path = tmp_path / "all.tsv"
    path.write_text("variant\tvalue\nsemvlp\t1\n")
    with pytest.raises(InputError, match="not a results table: no column task"):
        results_figure(path, "results")


@pytest.mark.slow
def test_a_figure_rule_with_a_malformed_input_fails_naming_the_file(tiny_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run.workdir, workdir, symlinks=True)
    broken = workdir / "results" / "pretrain" / "semvlp" / "phase1.metrics.json"
    broken.write_text('{"summary": {"mode": "single"}}')
    result = run_snakemake(workdir, "results/figures/pretraining/semvlp.png", "--cores", "1", "--forcerun", "figure_pretraining",
                           "--configfile", TINY, timeout=600)
    log = (workdir / "results" / "logs" / "figures" / "pretraining" / "semvlp.log").read_text()
    assert result.returncode != 0
    assert f"results/pretrain/semvlp/phase1.metrics.json: no 'history' (list)" in log
    assert not (workdir / "results" / "figures" / "pretraining" / "semvlp.png").exists()


@pytest.mark.slow
def test_the_report_holds_the_figures_and_tables_and_opens_in_a_browser(tiny_run, tmp_path):
    from test_mlflow_ui import chromium, headless

    result = run_snakemake(tiny_run.workdir, "--report", "results/report.zip", "--configfile", TINY, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    archive = tiny_run.workdir / "results" / "report.zip"
    names = zipfile.ZipFile(archive).namelist()
    images = [name for name in names if name.endswith(".png")]
    assert len(images) >= 8, names
    for expected in ("results.png", "detections.png", "detector.png", "finetuning.png", "vqa.png", "retrieval.png",
                     "all.tsv", "all.md", "provenance.tsv", "config.yaml", "summary.json"):
        assert any(name.endswith(f"/{expected}") for name in names), expected
    assert sum(name.endswith("/semvlp.png") for name in names) == 2  # its pre-training curves and grounding

    shutil.unpack_archive(archive, tmp_path / "unpacked")
    page = next((tmp_path / "unpacked").rglob("report.html")).as_uri()
    browser = chromium()
    dom = headless(browser, tmp_path / "profile-dom", "--dump-dom", page).stdout
    for words in ("SemVLP workflow", "pre-training", "fine-tuning", "regions", "results"):
        assert words in dom, words
    screenshot = tmp_path / "report.png"
    headless(browser, tmp_path / "profile-shot", f"--screenshot={screenshot}", "--window-size=1400,900", page)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "report.png").write_bytes(screenshot.read_bytes())
    subprocess.run(["unzip", "-l", str(archive)], check=False)  # in the test log, for a person to read
