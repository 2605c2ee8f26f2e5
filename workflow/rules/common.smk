# Helpers shared by the stage files: paths, per-variant schedules, code fingerprints.

import os

from semvlp.config import ablation_variants, extraction_config, variant_model_config
from semvlp.data import layout
from semvlp.data.corpus import SOURCE_IMAGE_SET, corpus_source_files, held_out_files
from semvlp.fingerprint import rule_fingerprint
from semvlp.tasks import TASKS as TASK_SPECS


DATA_ROOT = config["data"]["root"]
TASKS = list(config["finetune"]["tasks"])
SEEDS = config["finetune"]["seeds"]
IMAGE_SETS = config["regions"]["image_sets"]
# Image sets read from another set's store, not extracted again (DEVELOPERS.md, "Image sets").
FEATURES_FROM = config["regions"]["features_from"]
# Job priorities (DEVELOPERS.md, "Threads and priorities"): the pre-training chain first; region features
# before any fine-tuning, which would otherwise wait for a feature shard the chain held back; then
# fine-tunings longest first (default run: retrieval 165 s, VQA 90, GQA 46, NLVR2 29).
CHAIN_PRIORITY = 10
FEATURES_PRIORITY = 5
FINETUNE_PRIORITY = {"retrieval": 4, "vqa": 3, "gqa": 2, "nlvr2": 1}
ENV = "../../envs/semvlp.yaml"
RUN_JOB = "../scripts/run_job.py"


def features(image_set):
    return f"results/features/{FEATURES_FROM.get(image_set, image_set)}.h5"


def store_image_dirs(image_set):
    """The image folders whose images go into an image set's store: its own, then the sets read from it."""
    sets = [image_set] + [alias for alias, store in FEATURES_FROM.items() if store == image_set]
    return [str(layout.image_dir(DATA_ROOT, s)) for s in sets]


def pretrain_features():
    sets = {SOURCE_IMAGE_SET[s] for s in config["data"]["corpus"]["sources"]}
    return {s: features(s) for s in sorted(sets)}


def tokenizer_vocab():
    """The WordPiece vocabulary: trained on the corpus (scratch) or the BERT checkpoint's own."""
    init = config["model"]["init"]
    return "results/tokenizer/vocab.txt" if init == "scratch" else f"{init}/vocab.txt"


def task_inputs(wildcards):
    """A task's data files by name (semvlp.tasks.TaskSpec.files)."""
    files = TASK_SPECS[wildcards.task].files(DATA_ROOT, config["finetune"]["tasks"][wildcards.task])
    return {name: str(path) for name, path in files.items()}


def task_features(wildcards):
    """The feature stores of the image sets a task reads, by image set."""
    image_sets = TASK_SPECS[wildcards.task].image_sets(config["finetune"]["tasks"][wildcards.task])
    return {image_set: features(image_set) for image_set in image_sets}


def corpus_inputs():
    """The pre-training corpus's source files by source (VQA: questions and annotations)."""
    files = corpus_source_files(DATA_ROOT, config["data"]["corpus"]["sources"])
    return {source: [str(path) for path in paths] for source, paths in files.items()}


def held_out():
    """The files naming the evaluation images the corpus leaves out, by task and split."""
    if not config["data"]["corpus"]["exclude_eval_images"]:
        return {}
    splits = {task: settings["eval_splits"] for task, settings in config["finetune"]["tasks"].items()}
    files = held_out_files(DATA_ROOT, splits)
    return {task: {split: str(path) for split, path in by_split.items()} for task, by_split in files.items()}


def schedule(variant):
    return config["pretrain"]["variants"][variant]["phases"]


def final_checkpoint(wildcards):
    return f"results/pretrain/{wildcards.variant}/phase{len(schedule(wildcards.variant))}.safetensors"


def previous_checkpoint(wildcards):
    return f"results/pretrain/{wildcards.variant}/phase{int(wildcards.index) - 1}.safetensors"


def model_recipe(wildcards):
    """The config that makes a variant's pre-trained model (its model card's recipe)."""
    pretrain = config["pretrain"]
    phases = schedule(wildcards.variant)
    # a variant without phases (the ablation's `none`) is its initialisation: no phase setting made it
    training = ("phase", "masking", "itm_mismatch_ratio", "itm_sources", "loss_weights") if phases else ()
    return {
        "data": {"root": DATA_ROOT, "corpus": config["data"]["corpus"]},
        "regions": {key: config["regions"][key] for key in ("backend", "selection", "feature_dtype")},
        "model": variant_model_config(config, wildcards.variant),
        "pretrain": {"schedule": phases, "seed": pretrain["seed"], **{key: pretrain[key] for key in training}},
    }


def phase_mode(wildcards):
    phases = schedule(wildcards.variant)
    index = int(wildcards.index)
    if not 1 <= index <= len(phases):
        raise ValueError(f"variant {wildcards.variant} has {len(phases)} phases; phase {index} does not exist")
    return phases[index - 1]


def phase_metrics(wildcards):
    """A variant's phase metrics files, in schedule order."""
    phases = schedule(wildcards.variant)
    return [f"results/pretrain/{wildcards.variant}/phase{i}.metrics.json" for i in range(1, len(phases) + 1)]


def vqa_figure_inputs(wildcards):
    """The questions and annotations of VQA's first eval split, whose predictions the figure breaks down."""
    split = config["finetune"]["tasks"]["vqa"]["eval_splits"][0]
    return {"questions": str(layout.vqa_questions(DATA_ROOT, split)), "annotations": str(layout.vqa_annotations(DATA_ROOT, split))}


def pretraining_figures(variants):
    """The loss curves and grounding diagnostics of the variants that have phases."""
    return [f"results/figures/{kind}/{v}.png" for v in variants if schedule(v) for kind in ("pretraining", "grounding")]


def figure_outputs(variants):
    """The figures of a run that reports `variants`: what each needs is in the run."""
    tasks = config["finetune"]["tasks"]
    figures = ["results/figures/finetuning.png", "results/figures/detections.png", *pretraining_figures(variants)]
    if "vqa" in tasks and tasks["vqa"]["eval_splits"][0] not in layout.VQA_TEST_SPLITS:
        figures.append("results/figures/vqa.png")
    if "retrieval" in tasks:
        figures.append("results/figures/retrieval.png")
    if detector_weights():
        figures.append("results/figures/detector.png")
    return figures


def pretrain_checkpoints(variants):
    """Every checkpoint of the variants' phase chains (their .run_id files name the jobs' MLflow runs)."""
    return [f"results/pretrain/{v}/phase{i}.safetensors" for v in variants for i in range(len(schedule(v)) + 1)]


def config_without_tracking():
    """The complete config, minus where runs are logged (which changes no result, so reruns nothing)."""
    return {key: value for key, value in config.items() if key not in ("tracking", "experiment")}


def finetune_outputs(variants, seeds=SEEDS):
    return expand(
        "results/finetune/{variant}/{task}/seed{seed}/metrics.json", variant=variants, task=TASKS, seed=seeds
    )


# Code fingerprints (semvlp.fingerprint): the digest of every module a rule's jobs run, in its params,
# so that editing a module reruns exactly those jobs.
def code(rule):
    return rule_fingerprint(rule)


def task_code(wildcards):
    """A fine-tuning job also runs its task's module, which semvlp.tasks imports by name."""
    return rule_fingerprint("finetune", f"semvlp.tasks.{wildcards.task}")


def detector_weights():
    """The detector trained here (embedded default) when no torchvision weights are configured."""
    regions = config["regions"]
    if regions["backend"] == "torchvision" and regions["torchvision"]["weights"] is None:
        return ["results/detector/detector.pt"]
    return []


def rule_resources(rule, **defaults):
    """A rule's resources: its defaults, overridden by the config's `resources.<rule>` (paper.yaml).

    A job that asks for GPUs (`gpu` > 0 or a `gpu` gres) also gets `tasks_per_gpu: 0`: one SLURM task, one
    launcher that sees all the job's GPUs (semvlp/jobs.py starts torchrun itself, one process per GPU).
    With a `tasks_per_gpu` >= 1, or with none and a `tasks` >= 1 (which the SLURM plugin reads as tasks per
    GPU), the plugin would submit `--ntasks-per-gpu=N`: N tasks per GPU, each with its own cpus_per_task.
    """
    resources = {**defaults, **config.get("resources", {}).get(rule, {})}
    if is_gpu_job(resources):
        if resources.get("tasks_per_gpu", 0) != 0:
            raise ValueError(
                f"resources.{rule}: tasks_per_gpu={resources['tasks_per_gpu']!r}, but a GPU job of this "
                "workflow is one task that starts its own processes per GPU: leave tasks_per_gpu out"
            )
        resources["tasks_per_gpu"] = 0
    return resources


def is_gpu_job(resources):
    """Whether the SLURM plugin treats a job with these resources as a GPU job (its own test)."""
    return bool(resources.get("gpu")) or "gpu" in str(resources.get("gres", ""))
