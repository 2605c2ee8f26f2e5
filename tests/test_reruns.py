"""Precise reruns: after a completed tiny run, a changed value or an edited module reruns exactly the jobs
it touches (README, "Configuration"). Each case asks Snakemake's dry run for the jobs it would run and
compares them, job by job (rule and wildcards), with the jobs the change should reach.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BIN, REPO

TARGET = "results/all.tsv"

# The tiny config's DAG (config/tiny.yaml): phases per variant (report rows), tasks, seeds, image sets, shards.
PHASES = {"semvlp": 2, "none": 0}
VARIANTS = ("semvlp", "none")
TASKS = ("vqa", "gqa", "nlvr2", "retrieval")
SEEDS = (0,)
IMAGE_SETS = ("coco", "vg", "nlvr2", "flickr30k", "cc")  # config/tiny.yaml's (vg's store serves gqa)
SHARDS = 2

Job = tuple[str, tuple[tuple[str, str], ...]]  # (rule, sorted wildcard items)
JOB_HEADER = re.compile(r"^(?:local)?rule (\w+):$")


def job(rule: str, **wildcards) -> Job:
    return rule, tuple(sorted((name, str(value)) for name, value in wildcards.items()))


def planned_jobs(output: str) -> list[Job]:
    """The jobs a dry run lists: one `rule NAME:` block each, with an indented `wildcards:` line."""
    jobs: list[Job] = []
    rule, wildcards = None, {}
    for line in output.splitlines() + [""]:
        header = JOB_HEADER.match(line)
        in_block = rule is not None and line.startswith("    ")
        if rule is not None and not in_block:
            jobs.append(job(rule, **wildcards))
            rule, wildcards = None, {}
        if header:
            rule = header.group(1)
        elif in_block and line.strip().startswith("wildcards:"):
            items = line.split("wildcards:", 1)[1].split(",")
            wildcards = dict(item.strip().split("=", 1) for item in items)
    return jobs


def job_stats(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}; empty when nothing is to be done."""
    if "Job stats:" not in output:
        return {}
    table = output.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.MULTILINE)}


def snapshot(destination: Path, source: Path = REPO) -> Path:
    """A copy of the workflow and the package. Its Snakefile imports, fingerprints and runs this copy
    (Snakemake puts the Snakefile's folder first on sys.path; PYTHONPATH does it for the jobs), so
    edits others make to the shared tree meanwhile change nothing here."""
    destination.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "workflow", "config", "envs", "semvlp"):
        if (source / name).is_dir():
            shutil.copytree(source / name, destination / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source / name, destination / name)
    return destination


def snakemake(checkout: Path, workdir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the checkout's Snakefile in `workdir`, its jobs importing the checkout's package."""
    cmd = [str(BIN / "snakemake"), "--snakefile", str(checkout / "Snakefile"), "--directory", str(workdir), *args]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(checkout)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def dry_run(checkout: Path, workdir: Path, *overrides: str) -> set[Job]:
    """The set of jobs `snakemake -n results/all.tsv --configfile tiny.yaml OVERRIDES...` would run."""
    result = snakemake(checkout, workdir, TARGET, "-n", "--configfile", str(checkout / "config" / "tiny.yaml"), *overrides)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    jobs = planned_jobs(output)
    # the parse must agree with Snakemake's own count of every rule
    counts = {rule: sum(1 for r, _ in jobs if r == rule) for rule, _ in jobs}
    assert counts == job_stats(output), output[-6000:]
    assert len(jobs) == len(set(jobs)), output[-6000:]
    return set(jobs)


# ---------------------------------------------------------------------------------- expected job sets


def finetunes(variants=VARIANTS, tasks=TASKS) -> set[Job]:
    return {job("finetune", variant=v, task=t, seed=s) for v in variants for t in tasks for s in SEEDS}


def phases(variant: str, first: int = 1) -> set[Job]:
    return {job("pretrain_phase", variant=variant, index=i) for i in range(first, PHASES[variant] + 1)}


def exports(variants=VARIANTS) -> set[Job]:
    return {job("export_model", variant=v) for v in variants}


REPORT = {job("report")}
FINETUNE_FIGURES = {job("figure_finetuning"), job("figure_vqa"), job("figure_retrieval")}


def pretraining_figures(variants=VARIANTS) -> set[Job]:
    return {job("figure_pretraining", variant=v) for v in variants if PHASES[v]}


FIGURES = pretraining_figures() | FINETUNE_FIGURES | {job("figure_detections"), job("figure_detector")}
EXTRACTION = {job("extract_regions", image_set=s, shard=k) for s in IMAGE_SETS for k in range(SHARDS)}
MERGES = {job("index_regions", image_set=s) for s in IMAGE_SETS}
INITS = {job("init_model", variant=v) for v in VARIANTS}
ALL_PHASES = set().union(*(phases(v) for v in VARIANTS))
DATA = {job("generate_world"), job("build_corpus"), job("train_tokenizer")}
DETECTOR = {job("train_detector")}
ALL_JOBS = DATA | DETECTOR | EXTRACTION | MERGES | INITS | ALL_PHASES | finetunes() | exports() | REPORT | FIGURES

CONFIG_CHANGES = {
    # one task's fine-tuning value: that task's jobs of every variant and seed, and the model cards
    # that give their results
    "finetune.tasks.vqa.lr": (
        {"finetune": {"tasks": {"vqa": {"lr": 2.0e-3}}}},
        finetunes(tasks=("vqa",)) | exports() | REPORT | {job("figure_finetuning"), job("figure_vqa")},
    ),
    # the mode of semvlp's 2nd phase: that phase onwards, not phase 1, not the other variant
    "pretrain.variants.semvlp.phases[2]": (
        {"pretrain": {"variants": {"semvlp": {"phases": ["single", "mixed"]}}}},
        phases("semvlp", first=2) | finetunes(variants=("semvlp",)) | exports(("semvlp",)) | REPORT
        | pretraining_figures(("semvlp",)) | FINETUNE_FIGURES,
    ),
    "pretrain.variants.semvlp.phases[1]": (
        {"pretrain": {"variants": {"semvlp": {"phases": ["two", "two"]}}}},
        phases("semvlp", first=1) | finetunes(variants=("semvlp",)) | exports(("semvlp",)) | REPORT
        | pretraining_figures(("semvlp",)) | FINETUNE_FIGURES,
    ),
    # shared by every phase: all phases and what they feed; `none` has no phase, so nothing of it
    "pretrain.phase.lr": (
        {"pretrain": {"phase": {"lr": 2.0e-3}}},
        ALL_PHASES | finetunes(variants=[v for v in VARIANTS if PHASES[v]]) | exports([v for v in VARIANTS if PHASES[v]]) | REPORT
        | pretraining_figures() | FINETUNE_FIGURES,
    ),
    # box selection: extraction and everything downstream of features, not the data or the detector
    "regions.selection.max_boxes": (
        {"regions": {"selection": {"max_boxes": 5}}},
        ALL_JOBS - DATA - DETECTOR - {job("figure_detector")},
    ),
    # where runs are logged changes no result
    "tracking": (
        {"experiment": "elsewhere", "tracking": {"enabled": False}},
        set(),
    ),
}

# Each edit appends a new function to the module: the fingerprints (semvlp.fingerprint) follow every
# module a rule's jobs import, so exactly the jobs that run the module rerun, and what they feed.
CODE_EDITS = {
    # the model cards' results table, and the figures (semvlp.figures reads its table columns)
    "semvlp/report.py": exports() | REPORT | FIGURES,
    # a task module: only that task's fine-tunings (TaskSpec.implementation imports it by name)
    "semvlp/tasks/vqa.py": finetunes(tasks=("vqa",)) | exports() | REPORT | {job("figure_finetuning"), job("figure_vqa")},
    "semvlp/tasks/common.py": finetunes() | exports() | REPORT | FINETUNE_FIGURES,
    # every phase measures its grounding with it, and init_model imports the pre-training module
    "semvlp/diagnostics.py": INITS | ALL_PHASES | finetunes() | exports() | REPORT | pretraining_figures() | FINETUNE_FIGURES,
    "semvlp/export.py": exports() | REPORT,
    "semvlp/regions/selection.py": ALL_JOBS - DATA,
}


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return snapshot(tmp_path_factory.mktemp("checkout"))


@pytest.fixture(scope="module")
def completed_run(checkout, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("rerun-base")
    tiny = str(checkout / "config" / "tiny.yaml")
    result = snakemake(checkout, workdir, TARGET, "--cores", "2", "--configfile", tiny, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    return workdir


def test_dry_run_parse_lists_every_job_of_a_fresh_run(checkout, tmp_path):
    assert dry_run(checkout, tmp_path) == ALL_JOBS


@pytest.mark.slow
def test_completed_run_plans_nothing(checkout, completed_run):
    assert dry_run(checkout, completed_run) == set()


@pytest.mark.slow
@pytest.mark.parametrize("change", list(CONFIG_CHANGES))
def test_config_change_reruns_exactly_what_it_touches(checkout, completed_run, tmp_path, change):
    override, expected = CONFIG_CHANGES[change]
    override_file = tmp_path / "override.yaml"
    override_file.write_text(yaml.safe_dump(override))
    planned = dry_run(checkout, completed_run, str(override_file))
    print(f"{change}: {len(planned)} jobs")
    assert planned == expected, f"unexpected: {sorted(planned - expected)}; missing: {sorted(expected - planned)}"


@pytest.mark.slow
@pytest.mark.parametrize("edited", [None, *CODE_EDITS], ids=["unedited", *CODE_EDITS])
def test_code_edit_reruns_only_its_stages(checkout, completed_run, tmp_path, edited):
    edited_checkout = snapshot(tmp_path / "checkout", source=checkout)
    if edited is not None:
        with open(edited_checkout / edited, "a") as f:
            f.write("\n\ndef an_added_function():\n    return None\n")
    expected = set() if edited is None else CODE_EDITS[edited]
    planned = dry_run(edited_checkout, completed_run)
    print(f"edit {edited or 'none (copy only)'}: {len(planned)} jobs")
    assert planned == expected, f"unexpected: {sorted(planned - expected)}; missing: {sorted(expected - planned)}"
