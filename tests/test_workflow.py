"""End to end: the tiny config through the real Snakemake DAG, from generated images to results/all.tsv."""

from __future__ import annotations

import re
import pandas as pd
import pytest

from conftest import TINY, run_snakemake
TASKS = {"vqa", "gqa", "nlvr2", "retrieval"}


def job_counts(dry_run_output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    table = dry_run_output.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


def test_dry_run_lists_alternating_phases_and_one_finetune_per_task(tmp_path):
    result = run_snakemake(tmp_path, "results/all.tsv", "-n", "--configfile", TINY, timeout=300)
    assert result.returncode == 0, result.stderr
    counts = job_counts(result.stdout)
    # tiny schedule: semvlp = [single, two]; none = []
    assert counts["pretrain_phase"] == 2
    assert counts["init_model"] == 2
    assert counts["finetune"] == 2 * 4  # variants x tasks x 1 seed
    # image sets x shards: coco, vg (GQA's store too), nlvr2, flickr30k, cc
    assert counts["extract_regions"] == 5 * 2 and "results/features/gqa" not in result.stdout
    gqa_finetune = next(job for job in result.stdout.split("rule finetune:")[1:] if "task=gqa" in job)
    assert "results/features/vg.h5" in gqa_finetune.split("output:")[0]
    assert "results/pretrain/semvlp/phase2.safetensors" in result.stdout
    assert "results/finetune/none/retrieval/seed0/metrics.json" in result.stdout


@pytest.mark.slow
def test_tiny_run_writes_a_tidy_table_with_all_tasks(tiny_run):
    workdir = tiny_run.workdir
    table = pd.read_csv(workdir / "results" / "all.tsv", sep="\t")
    assert list(table.columns) == ["variant", "task", "split", "metric", "seed", "value", "run_id"]
    assert set(table.task) == TASKS
    assert set(table.variant) == {"semvlp", "none"}
    assert table.run_id.notna().all() and (table.run_id.str.len() == 32).all()
    expected = {
        ("vqa", "val2014", "accuracy"),
        ("gqa", "val", "accuracy"),
        ("nlvr2", "dev", "accuracy"),
        ("nlvr2", "dev", "consistency"),
        ("retrieval", "test", "ir_r1"),
        ("retrieval", "test", "tr_r10"),
    }
    assert expected <= set(zip(table.task, table.split, table.metric))
    assert table.value.between(0, 100).all() or (table.metric == "rsum").any()
    markdown = (workdir / "results" / "all.md").read_text()
    assert "| semvlp |" in markdown and "| none |" in markdown and "VQA acc" in markdown


@pytest.mark.slow
def test_tiny_run_pretrains_on_visual_genome_and_conceptual_captions(tiny_run):
    import json

    from semvlp.data.corpus import read_corpus

    results = tiny_run.workdir / "results"
    summary = json.loads((results / "corpus" / "summary.json").read_text())
    assert set(summary["by_source"]) == {"coco_captions", "vqa", "gqa", "vg_captions", "vg_qa", "cc"}
    assert all(n > 0 for n in summary["by_source"].values())
    # the GQA val images are VG images: their phrases and QAs are held out; CC's dead URLs are dropped
    assert summary["dropped"]["vg_captions"]["held_out"] > 0 and summary["dropped"]["vg_qa"]["held_out"] > 0
    assert summary["dropped"]["cc"]["no_image"] > 0
    corpus = read_corpus(results / "corpus" / "pretrain.jsonl")
    assert {"vg", "cc"} <= {img_set for img_set, _ in corpus.images()}
    # one store serves GQA and VG (the dry-run test checks the GQA fine-tuning reads it)
    assert (results / "features" / "vg.h5").is_file() and not (results / "features" / "gqa.h5").exists()


@pytest.mark.slow
def test_tiny_run_logs_every_job_to_mlflow(tiny_run):
    workdir = tiny_run.workdir
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'results' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("semvlp-tiny")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("semvlp.kind") == "invocation"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in children)
    table = pd.read_csv(workdir / "results" / "all.tsv", sep="\t")
    child_ids = {r.info.run_id for r in children}
    assert set(table.run_id) <= child_ids
    finetune = [r for r in children if r.data.tags["semvlp.rule"] == "finetune"]
    assert len(finetune) == 8
    assert all("train_loss" in r.data.metrics for r in finetune)


@pytest.mark.slow
def test_completed_run_has_nothing_left_to_do(tiny_run):
    workdir = tiny_run.workdir
    result = run_snakemake(workdir, "results/all.tsv", "-n", "--configfile", TINY, timeout=300)
    assert result.returncode == 0
    assert "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.slow
def test_tiny_run_exports_the_reported_models_with_a_model_card(tiny_run):
    """results/models/{variant}: the last checkpoint's weights, the tokenizer and a card that names the
    run, the phases and the fine-tuning results; it loads with the model class alone."""
    import torch

    from semvlp.model import SemVLPForPreTraining
    from semvlp.tokenization import load_tokenizer

    results = tiny_run.workdir / "results"
    table = pd.read_csv(results / "all.tsv", sep="\t")
    for variant, phases in (("semvlp", 2), ("none", 0)):
        exported = SemVLPForPreTraining.from_pretrained(results / "models" / variant)
        checkpoint = results / "pretrain" / variant / f"phase{phases}.safetensors"
        trained, metadata = SemVLPForPreTraining.from_checkpoint(checkpoint)
        assert exported.state_dict().keys() == trained.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), trained.state_dict().values()))
        assert load_tokenizer(results / "models" / variant).vocab_size == exported.config.vocab_size
        card = (results / "models" / variant / "README.md").read_text()
        assert (checkpoint.parent / f"{checkpoint.name}.run_id").read_text().strip() in card
        assert len(metadata["history"]) == phases
        for entry in metadata["history"]:
            assert f"| {entry['phase']} | {entry['mode']} | {entry['summary']['steps']} | {entry['summary']['final_loss_total']:.3f} |" in card
        vqa = table[(table.variant == variant) & (table.task == "vqa") & (table.metric == "accuracy")]["value"]
        assert f"| {variant} | {vqa.mean():.2f} |" in card
