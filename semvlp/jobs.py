"""The bridge from Snakemake jobs to the package: one handler per rule.

Every rule runs `workflow/scripts/run_job.py`, which calls `run_job(snakemake)`. The handler for the
rule reads the job's inputs, outputs and params (never the config directly, except tracking settings,
which change no result), sends the job's output to its log file, opens the job's MLflow run and calls
the package function that does the work.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from semvlp import tracking
from semvlp.io import write_json, write_text

HANDLERS: dict[str, Callable] = {}
# Jobs whose MLflow runs also sample CPU, memory and GPU use.
TRAINING_RULES = {"train_detector", "extract_regions", "pretrain_phase", "finetune"}
STAGES = {
    "generate_world": "data",
    "build_corpus": "data",
    "train_tokenizer": "data",
    "train_detector": "regions",
    "extract_regions": "regions",
    "index_regions": "regions",
    "import_tsv_features": "regions",
    "init_model": "pretrain",
    "pretrain_phase": "pretrain",
    "finetune": "finetune",
    "export_model": "report",
    "figure_pretraining": "pretrain",
    "figure_finetuning": "finetune",
    "figure_vqa": "finetune",
    "figure_retrieval": "finetune",
    "figure_detections": "regions",
    "figure_detector": "regions",
    "report": "report",
    "ablation_report": "report",
}


def handler(rule: str):
    def register(fn):
        HANDLERS[rule] = fn
        return fn

    return register


@contextlib.contextmanager
def _output_to_log(log_path: str | None):
    """Send this process's stdout and stderr (Python and C level, e.g. tqdm) to the job's log file."""
    if not log_path:
        yield
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _params(smk) -> dict[str, Any]:
    return {k: v for k, v in dict(smk.params.items()).items() if k != "code"}


def run_job(smk) -> None:
    """Entry point of every rule (called from workflow/scripts/run_job.py)."""
    rule = smk.rule
    wildcards = dict(smk.wildcards.items())
    log_path = smk.log[0] if len(smk.log) else None
    run_name = " ".join([rule] + [f"{k}={v}" for k, v in wildcards.items()])
    tags = {"semvlp.rule": rule, "semvlp.stage": STAGES[rule], **{f"semvlp.{k}": v for k, v in wildcards.items()}}
    torch.set_num_threads(max(1, smk.threads))
    with _output_to_log(log_path):
        try:
            with tracking.job_run(smk.config, run_name, tags, system_metrics=rule in TRAINING_RULES) as job:
                job.log_params(_params(smk))
                HANDLERS[rule](smk, job)
                # written once the outputs are complete, next to the first of them
                write_text(f"{smk.output[0]}.run_id", job.run_id + "\n")
                if log_path:
                    job.log_artifact(log_path, "logs")
        except Exception:
            traceback.print_exc()
            raise


# ---------------------------------------------------------------------------------------------- data


@handler("generate_world")
def _generate_world(smk, job):
    from semvlp.data.world import WorldSpec, generate_world

    manifest = generate_world(Path(smk.params.root), WorldSpec(**smk.params.spec))
    counts = pd.json_normalize(manifest["counts"], sep=".").iloc[0].to_dict()  # {"coco.train2014.images": n, ...}
    job.log_metrics({f"count.{k}": float(v) for k, v in counts.items()})


@handler("build_corpus")
def _build_corpus(smk, job):
    from semvlp.data.corpus import held_out_images, merge_sources, write_corpus

    files = {source: list(paths) for source, paths in smk.input.items() if source != "held_out"}
    held_out = held_out_images(smk.params.held_out)  # the files are also the job's `held_out` inputs
    built = merge_sources(files, min_answer_count=smk.params.corpus["min_answer_count"], held_out=held_out)
    summary = built.summary()
    print("corpus:", summary, flush=True)
    write_corpus(built.records, built.table, smk.output.corpus, smk.output.answers)
    write_json(smk.output.summary, summary, indent=1)
    job.log_metrics(
        {"records": summary["records"], "qa_records": summary["qa_records"], "answers": summary["answers"]}
        | {f"records.{source}": n for source, n in summary["by_source"].items()}
        | {f"dropped.{source}.{why}": n for source, lost in summary["dropped"].items() for why, n in lost.items()}
    )


@handler("train_tokenizer")
def _train_tokenizer(smk, job):
    from semvlp.data.corpus import read_corpus
    from semvlp.tokenization import load_tokenizer, train_wordpiece

    records = read_corpus(smk.input.corpus)
    train_wordpiece((r.sentence for r in records), smk.params.vocab_size, Path(smk.output[0]).parent)
    job.log_metrics({"vocab_size": load_tokenizer(Path(smk.output[0]).parent).vocab_size})


# ------------------------------------------------------------------------------------------- regions


@handler("train_detector")
def _train_detector(smk, job):
    from semvlp.regions.train import train_detector

    cfg = {**smk.params.train, "detector": {"representation_size": smk.params.torchvision["representation_size"]}, "num_threads": smk.threads}
    result = train_detector(smk.input.instances, Path(smk.input.images) / "train2014", smk.output[0], cfg)
    for step, loss in enumerate(result["loss_history"]):
        job.log_metrics({"loss": loss}, step=step)
    job.log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float))})


@handler("extract_regions")
def _extract_regions(smk, job):
    from semvlp.engine import default_device
    from semvlp.regions.extract import extract_image_set, extractor_settings, list_images

    detector = smk.input.weights[0] if smk.input.weights else None  # the detector trained here
    settings = extractor_settings(smk.params.regions, detector, device=str(default_device()))
    folders = smk.input.images  # the set's folder, then those of the sets read from its store
    images = list_images(*([folders] if isinstance(folders, str) else folders))
    stats = extract_image_set(
        images,
        smk.output[0],
        settings,
        shard=int(smk.wildcards.shard),
        num_shards=smk.params.num_shards,
        skip_bad_images=smk.params.skip_bad_images,
        feature_dtype=smk.params.feature_dtype,
        batch_size=smk.params.batch_size,
        num_workers=smk.resources.loader_workers,
    )
    job.set_tags({"semvlp.device": settings["device"]})
    job.log_metrics({k: v for k, v in stats.items() if isinstance(v, (int, float))})


@handler("index_regions")
def _index_regions(smk, job):
    from semvlp.features import write_store_index

    # shards differ only in their index and how many undecodable images they skipped
    write_store_index(list(smk.input), smk.output[0], shard_keys=("shard", "num_skipped_images"))


@handler("import_tsv_features")
def _import_tsv_features(smk, job):
    from semvlp.features import import_tsv

    count = import_tsv(smk.input[0], smk.output[0], feature_dtype=smk.params.feature_dtype)
    job.log_metrics({"images": count})


# ------------------------------------------------------------------------------------------ pretrain


def _feature_inputs(smk) -> dict[str, str]:
    from semvlp.data.layout import IMAGE_SETS

    return {name: path for name, path in smk.input.items() if name in IMAGE_SETS}


@handler("init_model")
def _init_model(smk, job):
    from semvlp.pretrain import init_checkpoint

    report = init_checkpoint(
        smk.output[0],
        model_settings=smk.params.model,
        tokenizer_dir=Path(smk.input.tokenizer).parent,
        answers_path=smk.input.answers,
        feature_paths=_feature_inputs(smk),
        seed=smk.params.seed,
    )
    job.set_tags({"semvlp.init": report.get("init")})
    job.log_metrics({"parameters": report["parameters"]})


@handler("pretrain_phase")
def _pretrain_phase(smk, job):
    from semvlp.loader import LoaderSettings
    from semvlp.pretrain import PhaseSettings, run_phase

    p = smk.params
    index = int(smk.wildcards.index)
    job.set_tags({"semvlp.phase": index, "semvlp.mode": p.mode, "semvlp.upstream_run_id": tracking.read_run_id(f"{smk.input.checkpoint}.run_id")})
    settings = PhaseSettings(
        mode=p.mode,
        index=index,
        max_text_length=p.max_text_length,
        seed=p.seed,
        text_mask_prob=p.masking["text"],
        region_mask_prob=p.masking["regions"],
        itm_mismatch_ratio=p.itm_mismatch_ratio,
        itm_sources=p.itm_sources,
        loss_weights=dict(p.loss_weights),
        **p.phase,
    )
    args = dict(
        previous_checkpoint=smk.input.checkpoint,
        out_checkpoint=smk.output.checkpoint,
        metrics_path=smk.output.metrics,
        corpus_path=smk.input.corpus,
        answers_path=smk.input.answers,
        tokenizer_dir=str(Path(smk.input.tokenizer).parent),
        feature_paths=_feature_inputs(smk),
    )
    loader = LoaderSettings(num_workers=smk.resources.loader_workers, prefetch_factor=smk.resources.loader_prefetch)
    gpus = int(smk.resources.get("gpu", 0))
    if gpus > 1:
        summary = _torchrun_phase(args, settings, loader, gpus, job)
    else:
        summary = run_phase(**args, settings=settings, loader=loader, job=job)
    job.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    job.log_artifact(smk.output.metrics)


def _torchrun_phase(args: dict[str, Any], settings, loader, gpus: int, job) -> dict[str, Any]:
    """Run the phase as `gpus` DistributedDataParallel processes; log its curve once it is done."""
    import json
    import subprocess
    from dataclasses import asdict

    args_path = Path(f"{args['out_checkpoint']}.torchrun.json")
    write_json(args_path, {**args, "settings": asdict(settings), "loader": asdict(loader)})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "-m", "semvlp.pretrain", str(args_path)]
    print("launching:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    args_path.unlink()
    metrics = json.loads(Path(args["metrics_path"]).read_text())
    for entry in metrics["history"]:
        job.log_metrics({k: v for k, v in entry.items() if k not in ("step", "mode")}, step=entry["step"])
    return metrics["summary"]


# ------------------------------------------------------------------------------------------ finetune


@handler("finetune")
def _finetune(smk, job):
    from semvlp.tasks import task_spec
    from semvlp.tasks.runner import run_task

    task, seed = smk.wildcards.task, int(smk.wildcards.seed)
    task_config = dict(smk.params.task_config)
    feature_paths = {image_set: smk.input[image_set] for image_set in task_spec(task).image_sets(task_config)}
    out_dir = Path(smk.output.metrics).parent
    job.set_tags({"semvlp.upstream_run_id": tracking.read_run_id(f"{smk.input.checkpoint}.run_id")})
    summary, results = run_task(
        task,
        checkpoint=smk.input.checkpoint,
        files={k: v for k, v in smk.input.items() if k not in ("checkpoint", "tokenizer", *feature_paths)},
        feature_paths=feature_paths,
        tokenizer_dir=Path(smk.input.tokenizer).parent,
        task_config=task_config,
        seed=seed,
        max_text_length=smk.params.max_text_length,
        out_dir=out_dir,
        model_dir=smk.output.model,
        job=job,
    )
    job.set_tags({"semvlp.mode": summary["mode"]})  # `auto` resolved against the checkpoint
    predictions = summary.pop("predictions")
    for split, metrics in results.items():
        job.log_metrics({f"{split}.{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    for name in predictions.values():
        job.log_artifact(out_dir / name, "predictions")
    write_json(
        smk.output.metrics,
        {
            "variant": smk.wildcards.variant, "task": task, "seed": seed, "run_id": job.run_id, "train": summary,
            "results": results, "predictions": predictions,
        },
        indent=1,
    )
    job.log_artifact(smk.output.metrics)


# -------------------------------------------------------------------------------------------- report


@handler("export_model")
def _export_model(smk, job):
    from semvlp.export import export_model

    commit, dirty = tracking.git_state()
    provenance = {"commit": commit, "dirty": dirty, "run_id": tracking.read_run_id(f"{smk.input.checkpoint}.run_id")}
    job.set_tags({"semvlp.upstream_run_id": provenance["run_id"]})
    summary = export_model(
        smk.input.checkpoint,
        smk.output[0],
        variant=smk.wildcards.variant,
        tokenizer_dir=Path(smk.input.tokenizer).parent,
        finetune_metrics=list(smk.input.finetune),
        recipe=dict(smk.params.recipe),
        provenance=provenance,
    )
    job.log_metrics(summary)
    job.log_artifact(Path(smk.output[0]) / "README.md")


# ------------------------------------------------------------------------------------------- figures


def _log_figures(job, paths, upstream: list[str | Path] = ()) -> None:
    """Log figures to the job's run and to the runs of the jobs they show (`upstream`: their outputs,
    whose .run_id files name the runs), so MLflow shows each beside the metrics it plots. Each goes
    under `figures/` as below results/figures/ (pretraining/semvlp.png and grounding/semvlp.png apart)."""
    for path in map(Path, paths):
        folder = "figures" if path.parent.name == "figures" else f"figures/{path.parent.name}"
        job.log_artifact(path, folder)
        for output in upstream:
            job.log_artifact_to(tracking.read_run_id(f"{output}.run_id"), path, folder)


@handler("figure_pretraining")
def _figure_pretraining(smk, job):
    from semvlp.figures import grounding_figure, pretraining_figure, save_figure

    variant, phases = smk.wildcards.variant, list(smk.input)
    save_figure(pretraining_figure(variant, phases), smk.output.curves)
    save_figure(grounding_figure(variant, phases), smk.output.grounding)
    last_checkpoint = phases[-1].replace(".metrics.json", ".safetensors")
    _log_figures(job, [smk.output.curves, smk.output.grounding], [last_checkpoint])


@handler("figure_finetuning")
def _figure_finetuning(smk, job):
    from semvlp.figures import finetuning_figure, save_figure

    _log_figures(job, [save_figure(finetuning_figure(list(smk.input.metrics)), smk.output[0])])


@handler("figure_vqa")
def _figure_vqa(smk, job):
    from semvlp.figures import save_figure, vqa_figure

    figure = vqa_figure(list(smk.input.metrics), smk.input.questions, smk.input.annotations)
    _log_figures(job, [save_figure(figure, smk.output[0])])


@handler("figure_retrieval")
def _figure_retrieval(smk, job):
    from semvlp.figures import retrieval_figure, save_figure

    _log_figures(job, [save_figure(retrieval_figure(list(smk.input.metrics), smk.input.dataset), smk.output[0])])


@handler("figure_detections")
def _figure_detections(smk, job):
    from semvlp.figures import detections_figure, save_figure

    stores = dict(zip(smk.params.image_sets, smk.input.stores))
    _log_figures(job, [save_figure(detections_figure(stores, smk.params.image_dirs), smk.output[0])])


@handler("figure_detector")
def _figure_detector(smk, job):
    from semvlp.figures import detector_figure, save_figure

    _log_figures(job, [save_figure(detector_figure(smk.input[0]), smk.output[0])], [smk.input[0]])


@handler("report")
@handler("ablation_report")
def _report(smk, job):
    import yaml

    from semvlp.figures import results_figure, save_figure
    from semvlp.report import write_provenance, write_tables

    table = write_tables(list(smk.input.metrics), smk.params.variants, smk.output.tsv, smk.output.markdown)
    title = "ablation" if smk.rule == "ablation_report" else "results"
    save_figure(results_figure(smk.output.tsv, title), smk.output.figure)
    write_text(smk.output.config, yaml.safe_dump(dict(smk.params.config), sort_keys=False))
    commit, dirty = tracking.git_state()
    runs = {path: path for path in smk.input.metrics}
    runs.update({path: f"{path}.run_id" for path in [*smk.input.get("figures", []), *smk.params.checkpoints]})
    write_provenance(smk.output.provenance, commit=commit, dirty=dirty, config_path=smk.output.config, runs=runs)
    job.log_metrics({"rows": len(table)})
    for path in (smk.output.tsv, smk.output.markdown, smk.output.figure, smk.output.provenance, smk.output.config):
        job.log_artifact(path)
    _log_figures(job, smk.input.get("figures", []))
