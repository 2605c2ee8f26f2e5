"""The benchmarks run end to end: training throughput (its work accounting says what the docstring claims),
the input pipeline, paper-scale memory and the CPU code-path study."""

from __future__ import annotations

import json
import re
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import cpu_determinism  # noqa: E402
import input_pipeline  # noqa: E402
import paper_scale_memory  # noqa: E402
import train_throughput  # noqa: E402

pytest.importorskip("transformers")


def _table(output: str) -> list[dict[str, str]]:
    """The printed Markdown table as one dict per row."""
    lines = [line for line in output.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[1:]]


def test_throughput_benchmark_prints_both_pairs_with_flops(capsys):
    train_throughput.main(["--sizes", "tiny", "--batch-size", "2", "--warmup", "0", "--steps", "1", "--threads", "1"])
    output = capsys.readouterr().out
    rows = _table(output)
    assert [(row["model"], row["mode"]) for row in rows] == [
        ("LXMERT", "two"), ("SemVLP", "two"), ("VisualBERT", "single"), ("SemVLP", "single"),
    ]
    for reference, ours in (rows[0:2], rows[2:4]):
        assert float(reference["GFLOP/step"]) > 0 and float(ours["GFLOP/step"]) > 0
        # the reference models run their heads at every position, ours only where the losses read them
        flop_ratio = float(reference["GFLOP/step"]) / float(ours["GFLOP/step"])
        assert flop_ratio > 1
        assert float(ours["ref/ours FLOP"].rstrip("x")) == pytest.approx(flop_ratio, abs=0.05)  # GFLOP are rounded
        assert float(ours["ours/ref"].rstrip("x")) > 0
    assert "MFU" not in rows[0]
    assert re.search(r"^command: .*benchmarks/train_throughput\.py --sizes tiny", output, re.MULTILINE)


def test_heads_everywhere_costs_more_flops():
    batch = train_throughput.make_batch(2, 20, 36, seed=0, device=train_throughput.torch.device("cpu"))
    size = train_throughput.SIZES["tiny"]
    flops = {}
    for everywhere in (False, True):
        trainer = train_throughput.Trainer(
            "SemVLP", train_throughput.ours(size), train_throughput.ours_loss("two", everywhere),
            train_throughput.torch.device("cpu"), bf16=False,
        )
        trainer.count_flops(batch)
        flops[everywhere] = trainer.flops
        assert all(p.grad is None for p in trainer.model.parameters())  # the counted step leaves no gradients
    # the forward vocabulary projection alone at all 20 tokens instead of the few (about 3) masked ones
    at_least_ten_more_tokens = 2 * 10 * 2 * 256 * train_throughput.VOCAB_SIZE  # examples, tokens, FLOPs per MAC, H, V
    assert flops[True] > flops[False] + at_least_ten_more_tokens


@pytest.mark.parametrize("workers", [0, 1])
def test_input_pipeline_benchmark_reads_a_sharded_store(tmp_path, capsys, workers):
    input_pipeline.main(["--images", "16", "--batch-size", "8", "--steps", "2", "--workers", str(workers), "--cache-dir", str(tmp_path)])
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["workers"] == workers and figures["batch_size"] == 8
    assert figures["samples_per_s"] > 0 and figures["ceiling_samples_per_s"] > 0
    assert figures["h200_need_samples_per_s"] == round(0.4 * 989e12 / (1075.8e9 / 32))
    assert len(list((tmp_path / "store16").glob("shard*.h5"))) == 8


def test_paper_scale_memory_benchmark_measures_both_preparations(tmp_path, capsys):
    """At a small size: the official-format VQA files and the corpus load, in fresh processes."""
    paper_scale_memory.main(["--questions", "2000", "--sentences", "5000", "--cache-dir", str(tmp_path)])
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["corpus_sentences"] == 5000
    assert figures["vqa_answers"] == 2000 // (2 * 9) and 0 < figures["vqa_examples"] <= 2000
    assert figures["vqa_peak_rss_mb"] > 0 and figures["corpus_peak_rss_mb"] > 0


def test_cpu_determinism_benchmark_runs_each_setting_in_its_own_process(capsys):
    settings = ["aten-avx2", "pinned-avx2", "pinned-avx2-again"]
    cpu_determinism.main(["--steps", "2", "--batch-size", "2", "--threads", "1", "--settings", *settings])
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(figures["settings"]) == {"default", *settings}
    assert figures["settings"]["default"]["equals_default"] and figures["pinned_avx2_repeats"]
    assert figures["settings"]["aten-avx2"]["aten_capability"] == "AVX2"  # the switch reached the process
