"""Figures of a run, each drawn from a job's own outputs (metrics files, result tables, prediction files,
feature stores, images): what the Snakemake report shows and MLflow keeps beside the metrics.

Every `*_figure` function returns the matplotlib Figure, so tests can compare the drawn data with the
files it came from; `save_figure` writes it as a PNG, atomically. Matplotlib runs headless (Agg).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on a cluster node or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from semvlp.errors import InputError  # noqa: E402
from semvlp.io import atomic_path, read_json  # noqa: E402

LOSS_TERMS = ("loss_total", "loss_mlm", "loss_itm", "loss_qa", "loss_obj_label", "loss_attr_label", "loss_obj_feat")
MODE_COLOURS = {"single": "#dbe9f6", "two": "#fde4cf", "mixed": "#e2f0d9"}
DPI = 100


def save_figure(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        figure.savefig(file, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return path


def _field(record: dict, key: str, path: Path, kind=None):
    if key not in record or (kind is not None and not isinstance(record[key], kind)):
        raise InputError(f"no '{key}'" + (f" ({kind.__name__})" if kind else ""), path)
    return record[key]


def _phase_histories(paths: Sequence[str | Path]) -> list[tuple[Path, dict, list[dict]]]:
    phases = []
    for path in map(Path, paths):
        record = read_json(path)
        history = _field(record, "history", path, list)
        if not history:
            raise InputError("the phase's history is empty", path)
        phases.append((path, _field(record, "summary", path, dict), history))
    return phases


def pretraining_figure(variant: str, phase_metrics: Sequence[str | Path]) -> Figure:
    """Each loss term and the matching accuracy over the steps of all the variant's phases, in order;
    phases shaded by mode and their boundaries marked."""
    phases = _phase_histories(phase_metrics)
    terms = [t for t in LOSS_TERMS if any(t in entry for _, _, history in phases for entry in history)] + ["itm_accuracy"]
    columns = 4
    rows = -(-len(terms) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.6 * rows), squeeze=False)
    offset = 0
    for index, (_, summary, history) in enumerate(phases, 1):
        steps = [offset + entry["step"] for entry in history]
        end = offset + len(history)
        for ax, term in zip(axes.flat, terms):
            ax.axvspan(offset, end, color=MODE_COLOURS.get(summary["mode"], "#eeeeee"), lw=0)
            if offset:
                ax.axvline(offset, color="#555555", lw=0.8, ls="--", label="_boundary")
            values = [entry.get(term, np.nan) for entry in history]
            ax.plot(steps, values, color="#1f4e79", lw=1, label=f"phase {index}")
        offset = end
    for ax, term in zip(axes.flat, terms):
        ax.set_title(term, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(terms):]:
        ax.set_visible(False)
    modes = " | ".join(f"{i + 1}: {summary['mode']}" for i, (_, summary, _) in enumerate(phases))
    figure.suptitle(f"pre-training {variant}: phases {modes} (shading: blue single, orange two, green mixed)", fontsize=10)
    figure.tight_layout()
    return figure


GROUNDING = (("mlm_image_gain", "MLM loss, other image - own image"), ("itm_accuracy", "ITM accuracy on held-out pairs"))


def grounding_figure(variant: str, phase_metrics: Sequence[str | Path]) -> Figure:
    """The grounding diagnostics after every phase, in both modes (the README's single/two table)."""
    phases = _phase_histories(phase_metrics)
    figure, axes = plt.subplots(1, len(GROUNDING), figsize=(5 * len(GROUNDING), 3), squeeze=False)
    x = np.arange(len(phases))
    for ax, (key, title) in zip(axes[0], GROUNDING):
        for shift, mode in ((-0.2, "single"), (0.2, "two")):
            values = [summary.get(f"grounding_{mode}_{key}", np.nan) for _, summary, _ in phases]
            ax.bar(x + shift, values, width=0.4, label=f"{mode} mode")
        ax.set_xticks(x, [f"{i + 1}: {summary['mode']}" for i, (_, summary, _) in enumerate(phases)], fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.axhline(0, color="#555555", lw=0.6)
        ax.legend(fontsize=7)
    figure.suptitle(f"grounding after each phase of {variant} (trained mode on the x axis)", fontsize=10)
    figure.tight_layout()
    return figure


def _results_table(path: str | Path) -> pd.DataFrame:
    from semvlp.report import TSV_COLUMNS

    path = Path(path)
    try:
        table = pd.read_csv(path, sep="\t")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise InputError(f"not a results table ({error})", path) from None
    missing = [c for c in TSV_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"not a results table: no column {', '.join(missing)}", path)
    return table


def results_figure(tsv: str | Path, title: str) -> Figure:
    """One panel per task metric (the paper table's), the variants side by side; with several seeds the
    bar is the mean and the error bar the sample std over seeds, each seed a dot."""
    from semvlp.report import PAPER_COLUMNS

    table = _results_table(tsv)
    first_split = table.groupby("task")["split"].first().to_dict()
    panels = [(task, metric, name) for task, metric, name in PAPER_COLUMNS if task in first_split]
    variants = list(dict.fromkeys(table["variant"]))
    columns = min(5, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.8 * rows), squeeze=False)
    for ax, (task, metric, name) in zip(axes.flat, panels):
        chosen = table[(table.task == task) & (table.metric == metric) & (table.split == first_split[task])]
        for i, variant in enumerate(variants):
            values = chosen[chosen.variant == variant]["value"].to_numpy()
            if not len(values):
                continue
            spread = values.std(ddof=1) if len(values) > 1 else 0.0
            ax.bar(i, values.mean(), yerr=spread, capsize=3, color=f"C{i % 10}")
            if len(values) > 1:
                ax.plot([i] * len(values), values, "k.", ms=3)
        ax.set_xticks(range(len(variants)), variants, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{name} ({first_split[task]})", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    seeds = sorted(table["seed"].unique().tolist())
    figure.suptitle(f"{title}: seeds {seeds}" + ("; mean ± std over seeds" if len(seeds) > 1 else ""), fontsize=10)
    figure.tight_layout()
    return figure


def _finetune_records(paths: Sequence[str | Path]) -> list[tuple[Path, dict]]:
    records = []
    for path in map(Path, paths):
        record = read_json(path)
        for key in ("variant", "task", "seed", "train", "results"):
            _field(record, key, path)
        _field(record["train"], "loss_history", path, list)
        records.append((path, record))
    return records


def finetuning_figure(metrics_paths: Sequence[str | Path]) -> Figure:
    """The training loss of every fine-tuning job: one panel per task, a line per variant and seed."""
    records = _finetune_records(metrics_paths)
    tasks = list(dict.fromkeys(record["task"] for _, record in records))
    variants = list(dict.fromkeys(record["variant"] for _, record in records))
    figure, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for _, record in records:
            if record["task"] == task:
                colour = f"C{variants.index(record['variant']) % 10}"
                label = f"{record['variant']} seed {record['seed']}"
                ax.plot(record["train"]["loss_history"], color=colour, lw=0.8, alpha=0.8, label=label)
        ax.set_title(f"{task} training loss", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    figure.tight_layout()
    return figure


def vqa_figure(metrics_paths: Sequence[str | Path], questions: str | Path, annotations: str | Path, *, top_question_types: int = 12) -> Figure:
    """VQA accuracy by answer type and by question type (the most frequent types), variants side by side,
    from each job's predictions of the first eval split (the official per-question accuracy)."""
    from semvlp.data.formats import load_vqa
    from semvlp.metrics import vqa_question_accuracy

    records = _finetune_records(metrics_paths)
    annotated = {q.question_id: q for q in load_vqa(questions, annotations)}
    by_variant: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: {"answer type": defaultdict(list), "question type": defaultdict(list)})
    for path, record in records:
        split = next(iter(record["results"]))
        predictions = path.parent / _field(record, "predictions", path, dict).get(split, "")
        entries = read_json(predictions)
        if not isinstance(entries, list):
            raise InputError("expected a JSON list of predictions", predictions)
        legacy = read_json(path.parent / "model" / "task.json")["settings"]["legacy_normalization"]  # as the job scored
        for entry in entries:
            question = annotated.get(entry.get("question_id"))
            if question is None:
                raise InputError(f"question_id {entry.get('question_id')!r} is not in {Path(questions).name}", predictions)
            accuracy = vqa_question_accuracy(entry["answer"], question.answers, legacy_normalization=legacy)
            groups = by_variant[record["variant"]]
            groups["answer type"][question.answer_type].append(accuracy)
            groups["question type"][question.question_type].append(accuracy)
    counts = defaultdict(int)
    for q in annotated.values():
        counts[q.question_type] += 1
    question_types = sorted(counts, key=lambda t: -counts[t])[:top_question_types]
    answer_types = sorted({t for groups in by_variant.values() for t in groups["answer type"]})
    variants = list(by_variant)
    figure, axes = plt.subplots(1, 2, figsize=(14, 3.6), gridspec_kw={"width_ratios": [1, 3]})
    for ax, group, keys in ((axes[0], "answer type", answer_types), (axes[1], "question type", question_types)):
        width = 0.8 / max(len(variants), 1)
        for i, variant in enumerate(variants):
            values = [100 * np.mean(by_variant[variant][group][k]) if by_variant[variant][group][k] else np.nan for k in keys]
            ax.bar(np.arange(len(keys)) + (i - (len(variants) - 1) / 2) * width, values, width=width, label=variant)
        ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("accuracy (%)", fontsize=8)
        ax.set_title(f"VQA accuracy by {group}", fontsize=9)
        ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def retrieval_figure(metrics_paths: Sequence[str | Path], dataset: str | Path, *, max_k: int = 50) -> Figure:
    """Recall at K, K = 1 ... max_k, both directions, a line per variant and seed, from each job's score
    matrix of the first eval split (captions x images)."""
    from semvlp.metrics import read_retrieval_scores, retrieval_ranks

    records = _finetune_records(metrics_paths)
    variants = list(dict.fromkeys(record["variant"] for _, record in records))
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for path, record in records:
        split = next(iter(record["results"]))
        scores = path.parent / _field(record, "predictions", path, dict).get(split, "")
        image_ranks, text_ranks = retrieval_ranks(*read_retrieval_scores(dataset, split, scores))
        ks = np.arange(1, min(max_k, max(image_ranks.max(), text_ranks.max()) + 1) + 1)
        colour = f"C{variants.index(record['variant']) % 10}"
        for ax, ranks in ((axes[0], image_ranks), (axes[1], text_ranks)):
            ax.plot(ks, [100 * np.mean(ranks < k) for k in ks], color=colour, lw=1, label=f"{record['variant']} seed {record['seed']}")
    for ax, title in zip(axes, ("image retrieval (caption -> image)", "text retrieval (image -> caption)")):
        ax.set_title(f"{title}: R@K", fontsize=9)
        ax.set_xlabel("K", fontsize=8)
        ax.set_ylabel("recall (%)", fontsize=8)
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def detections_figure(stores: Mapping[str, str | Path], image_dirs: Mapping[str, Sequence[str | Path]], *, per_set: int = 4) -> Figure:
    """A contact sheet: the first `per_set` images of every image set's store with their kept boxes,
    each labelled with its object class, attribute and confidences."""
    from PIL import Image

    from semvlp.features import FeatureReader
    from semvlp.regions.extract import list_images

    figure, axes = plt.subplots(len(stores), per_set, figsize=(3 * per_set, 3 * len(stores)), squeeze=False)
    for row, (image_set, store) in enumerate(stores.items()):
        reader = FeatureReader(store)
        detector = reader.provenance.get("detector", {})  # the class names, where the backend records them
        objects, attributes = detector.get("categories", []), detector.get("attributes", [])
        files = {path.stem: path for path in list_images(*image_dirs[image_set])}
        for column, img_id in enumerate(reader.ids[:per_set]):
            ax = axes[row, column]
            if img_id not in files:
                raise InputError(f"image {img_id} of the store is in none of {', '.join(map(str, image_dirs[image_set]))}", store)
            with Image.open(files[img_id]) as image:
                ax.imshow(image.convert("RGB"))
            record = reader.get(img_id)
            for box, obj, obj_conf, attr, attr_conf in zip(record.boxes, record.obj_ids, record.obj_confs, record.attr_ids, record.attr_confs):
                x1, y1, x2, y2 = (float(v) for v in box)
                ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="yellow", lw=1))
                label = f"{_name(objects, obj)} {obj_conf:.2f}"
                if attributes:
                    label += f"\n{_name(attributes, attr)} {attr_conf:.2f}"
                ax.text(x1, y1, label, fontsize=5, color="black", va="bottom", bbox={"facecolor": "yellow", "alpha": 0.7, "pad": 0.5, "lw": 0})
            ax.set_title(f"{image_set}: {img_id}", fontsize=7)
            ax.axis("off")
        for column in range(len(reader.ids[:per_set]), per_set):
            axes[row, column].axis("off")
    figure.tight_layout()
    return figure


def _name(names: Sequence[str], index: int) -> str:
    return names[index] if 0 <= index < len(names) else f"#{index}"


def detector_figure(detector_path: str | Path) -> Figure:
    """The detector's training loss per step, and its held-out evaluation in the title."""
    from semvlp.regions.torchvision_backend import read_training_record

    record = read_training_record(detector_path)
    losses = _field(record.get("metrics", {}), "loss_history", Path(detector_path), list)
    figure, ax = plt.subplots(figsize=(6, 3))
    ax.plot(losses, color="#1f4e79", lw=1)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("loss", fontsize=8)
    held_out = {k: v for k, v in record["metrics"].items() if isinstance(v, float) and not k.startswith("loss")}
    ax.set_title("detector training loss; held-out: " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(held_out.items())[:4]), fontsize=8)
    figure.tight_layout()
    return figure
