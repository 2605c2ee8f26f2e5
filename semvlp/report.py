"""Results tables: the tidy `all.tsv`, a paper-style markdown table (mean ± std over seeds), and the
provenance of a report (code commit, config, the MLflow run of every job behind it)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pandas as pd

from semvlp.errors import InputError
from semvlp.io import read_json, write_text

TSV_COLUMNS = ["variant", "task", "split", "metric", "seed", "value", "run_id"]
# (task, metric, column title) of the paper-style table, in the order papers print them.
PAPER_COLUMNS = [
    ("vqa", "accuracy", "VQA acc"),
    ("gqa", "accuracy", "GQA acc"),
    ("nlvr2", "accuracy", "NLVR2 acc"),
    ("nlvr2", "consistency", "NLVR2 cons"),
    ("retrieval", "ir_r1", "IR R@1"),
    ("retrieval", "ir_r5", "IR R@5"),
    ("retrieval", "ir_r10", "IR R@10"),
    ("retrieval", "tr_r1", "TR R@1"),
    ("retrieval", "tr_r5", "TR R@5"),
    ("retrieval", "tr_r10", "TR R@10"),
]


def tidy_rows(metrics_paths: Iterable[str | Path]) -> pd.DataFrame:
    """One row per (variant, task, split, metric, seed) from fine-tune jobs' metrics.json files."""
    rows = []
    for path in metrics_paths:
        record = read_json(path)
        for key in ("variant", "task", "seed", "run_id", "results"):
            if key not in record:
                raise InputError(f"missing field '{key}'", path)
        for split, metrics in record["results"].items():
            flat = {}
            for name, value in metrics.items():
                if isinstance(value, dict):  # e.g. VQA per answer type
                    flat.update({f"{name}.{k}": v for k, v in value.items()})
                elif not name.startswith("num_"):
                    flat[name] = value
            for name, value in flat.items():
                rows.append([record["variant"], record["task"], split, name, record["seed"], float(value), record["run_id"]])
    return pd.DataFrame(rows, columns=TSV_COLUMNS)


def paper_table(table: pd.DataFrame, variants: list[str]) -> str:
    """Markdown: one row per variant, one column per task metric, mean ± std over seeds (first eval split)."""
    first_split = table.groupby("task")["split"].first().to_dict()
    header = ["variant"] + [title for task, _, title in PAPER_COLUMNS if task in first_split]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in variants:
        cells = [variant]
        for task, metric, _ in PAPER_COLUMNS:
            if task not in first_split:
                continue
            values = table[
                (table.variant == variant) & (table.task == task) & (table.metric == metric) & (table.split == first_split[task])
            ]["value"]
            if values.empty:
                cells.append("–")
            elif len(values) == 1:
                cells.append(f"{values.iloc[0]:.2f}")
            else:
                cells.append(f"{values.mean():.2f} ± {values.std(ddof=1):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted(table["seed"].unique().tolist())
    splits = ", ".join(f"{task}: {split}" for task, split in first_split.items())
    lines += ["", f"Seeds: {seeds}. Splits: {splits}. Values in percent; mean ± sample std over seeds."]
    return "\n".join(lines) + "\n"


def write_tables(metrics_paths: Iterable[str | Path], variants: list[str], tsv_path: str | Path, markdown_path: str | Path) -> pd.DataFrame:
    table = tidy_rows(metrics_paths)
    write_text(tsv_path, table.to_csv(sep="\t", index=False))
    write_text(markdown_path, paper_table(table, variants))
    return table


PROVENANCE_COLUMNS = ["kind", "name", "value"]


def write_provenance(
    path: str | Path, *, commit: str, dirty: str, config_path: str | Path, runs: dict[str, str | Path]
) -> pd.DataFrame:
    """provenance.tsv: the code commit (and whether the tree had uncommitted changes), the config file,
    and the MLflow run id of each output in `runs` ({output: its `.run_id` file or a metrics.json})."""
    rows = [["code", "commit", commit], ["code", "uncommitted changes", dirty], ["config", "complete config", str(config_path)]]
    for output, source in runs.items():
        source = Path(source)
        if source.suffix == ".json":
            run_id = read_json(source).get("run_id", "")
        else:
            run_id = source.read_text().strip() if source.is_file() else ""
        rows.append(["mlflow run", str(output), run_id or "(tracking off)"])
    table = pd.DataFrame(rows, columns=PROVENANCE_COLUMNS)
    write_text(path, table.to_csv(sep="\t", index=False))
    return table
