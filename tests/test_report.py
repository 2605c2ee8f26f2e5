"""Results tables from fine-tune metrics files."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from semvlp.errors import InputError
from semvlp.report import paper_table, write_tables


def metrics_file(tmp_path, variant, task, seed, results):
    path = tmp_path / f"{variant}-{task}-{seed}.json"
    path.write_text(json.dumps({"variant": variant, "task": task, "seed": seed, "run_id": f"run-{variant}-{task}-{seed}", "results": results}))
    return path


def test_tidy_table_and_paper_table(tmp_path):
    paths = []
    for seed, (vqa, gqa) in enumerate([(60.0, 40.0), (62.0, 44.0)]):
        paths.append(metrics_file(tmp_path, "semvlp", "vqa", seed, {"val2014": {"accuracy": vqa, "per_answer_type": {"yes/no": 80.0}, "num_questions": 10}}))
        paths.append(metrics_file(tmp_path, "semvlp", "gqa", seed, {"val": {"accuracy": gqa, "num_questions": 10}}))
    paths.append(metrics_file(tmp_path, "none", "vqa", 0, {"val2014": {"accuracy": 50.0, "num_questions": 10}}))
    table = write_tables(paths, ["semvlp", "none"], tmp_path / "all.tsv", tmp_path / "all.md")

    read = pd.read_csv(tmp_path / "all.tsv", sep="\t")
    assert list(read.columns) == ["variant", "task", "split", "metric", "seed", "value", "run_id"]
    assert len(read) == len(table) == 2 * 2 + 2 + 1  # per seed: 2 VQA rows, 1 GQA row; num_* are not metrics
    row = read[(read.variant == "semvlp") & (read.metric == "per_answer_type.yes/no") & (read.seed == 1)]
    assert row.value.item() == 80.0 and row.run_id.item() == "run-semvlp-vqa-1"

    markdown = (tmp_path / "all.md").read_text()
    lines = markdown.splitlines()
    assert lines[0] == "| variant | VQA acc | GQA acc |"
    # mean ± sample std over the two seeds: 61 ± 1.41, 42 ± 2.83; a single seed prints its value
    assert lines[2] == "| semvlp | 61.00 ± 1.41 | 42.00 ± 2.83 |"
    assert lines[3] == "| none | 50.00 | – |"


def test_metrics_file_without_run_id_is_refused(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"variant": "a", "task": "vqa", "seed": 0, "results": {}}))
    with pytest.raises(InputError, match="m.json: missing field 'run_id'"):
        write_tables([path], ["a"], tmp_path / "t.tsv", tmp_path / "t.md")
    assert not (tmp_path / "t.tsv").exists()


def test_paper_table_orders_columns_like_papers(tmp_path):
    table = pd.DataFrame(
        [
            ["v", "retrieval", "test", "ir_r1", 0, 10.0, "r"],
            ["v", "nlvr2", "dev", "consistency", 0, 20.0, "r"],
            ["v", "nlvr2", "dev", "accuracy", 0, 70.0, "r"],
        ],
        columns=["variant", "task", "split", "metric", "seed", "value", "run_id"],
    )
    header = paper_table(table, ["v"]).splitlines()[0]
    assert header.startswith("| variant | NLVR2 acc | NLVR2 cons | IR R@1 |")
