"""Pre-training phases on real (small) files: determinism, resume after a kill, checkpoints, modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import kill_once_written
from semvlp.data.answers import AnswerTable
from semvlp.data.corpus import CorpusRecord, write_corpus
from semvlp.features import FeatureWriter, RegionRecord
from semvlp.batching import RegionBank
from semvlp.data.corpus import read_corpus
from semvlp.loader import LoaderSettings
from semvlp.model import SemVLPForPreTraining
from semvlp.pretrain import PhaseSettings, PretrainBatches, batch_loader, init_checkpoint, run_phase
from semvlp.tokenization import load_tokenizer
from semvlp.tokenization import train_wordpiece

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A feature store, a corpus with captions and QA, an answer table, a tokenizer, an initial checkpoint."""
    root = tmp_path_factory.mktemp("pretrain")
    rng = np.random.default_rng(0)
    records, regions = [], []
    for i in range(24):
        colour, shape = COLOURS[i % 4], SHAPES[i % 3]
        img_id = f"img{i:03d}"
        n = int(rng.integers(2, 6))
        regions.append(
            RegionRecord(
                img_id=img_id,
                img_h=64,
                img_w=64,
                boxes=np.tile(np.array([[4, 4, 30, 30]], np.float32), (n, 1)),
                features=rng.standard_normal((n, 16)).astype(np.float32),
                obj_ids=rng.integers(1, 4, n),
                obj_confs=rng.uniform(0.3, 1, n).astype(np.float32),
                attr_ids=rng.integers(1, 5, n),
                attr_confs=rng.uniform(0.3, 1, n).astype(np.float32),
            )
        )
        records.append(CorpusRecord("coco", img_id, f"a {colour} {shape} on the left", None, "coco_captions"))
        records.append(CorpusRecord("coco", img_id, f"what colour is the {shape}?", colour, "vqa"))
    with FeatureWriter(root / "coco.h5", num_images=len(regions), max_boxes=6, feature_dim=16, feature_dtype="float32", provenance={"backend": "test"}) as writer:
        for i, record in enumerate(regions):
            writer.write(i, record)
    table = AnswerTable.from_counts({c: 6 for c in COLOURS}, 1)
    write_corpus(records, table, root / "corpus.jsonl", root / "answers.json")
    train_wordpiece([r.sentence for r in records], 120, root / "tokenizer")
    init_checkpoint(
        root / "phase0.safetensors",
        model_settings={"init": "scratch", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                        "cross_layers": 1, "box_dim": 4, "dropout": 0.1, "max_text_length": 16,
                        "type_vocab_size": 0, "init_scheme": "pytorch"},
        tokenizer_dir=root / "tokenizer",
        answers_path=root / "answers.json",
        feature_paths={"coco": root / "coco.h5"},
        seed=0,
    )
    return {"root": root}


def settings(mode: str = "single", steps: int = 12, checkpoint_every: int = 4) -> PhaseSettings:
    return PhaseSettings(
        mode=mode, index=1, steps=steps, batch_size=8, lr=1e-3, warmup_ratio=0.1, weight_decay=0.01,
        checkpoint_every=checkpoint_every, mixed_single_ratio=0.5, text_mask_prob=0.15, region_mask_prob=0.15,
        itm_mismatch_ratio=0.5, max_text_length=16, seed=3, accumulation_steps=1, itm_sources=("coco_captions",),
        loss_weights={"mlm": 1, "obj_feat": 1, "obj_label": 1, "attr_label": 1, "itm": 1, "qa": 1},
    )


def phase(world, out_dir: Path, phase_settings: PhaseSettings) -> dict:
    root = world["root"]
    return run_phase(
        previous_checkpoint=root / "phase0.safetensors",
        out_checkpoint=out_dir / "phase1.safetensors",
        metrics_path=out_dir / "phase1.metrics.json",
        corpus_path=root / "corpus.jsonl",
        answers_path=root / "answers.json",
        tokenizer_dir=root / "tokenizer",
        feature_paths={"coco": root / "coco.h5"},
        settings=phase_settings,
    )


def without_dropout(checkpoint: Path, out: Path) -> None:
    """A copy of a checkpoint whose model has dropout 0 (same weights and metadata)."""
    model, metadata = SemVLPForPreTraining.from_checkpoint(checkpoint)
    metadata = {k: v for k, v in metadata.items() if k not in ("format", "config")}
    model.config.dropout = 0.0
    model.save_checkpoint(out, **metadata)


def history(out_dir: Path) -> list[dict]:
    return json.loads((out_dir / "phase1.metrics.json").read_text())["history"]


@pytest.mark.parametrize("mode", ["single", "two", "mixed"])
def test_phase_trains_and_checkpoints_everything(world, tmp_path, mode):
    summary = phase(world, tmp_path, settings(mode))
    trained, metadata = SemVLPForPreTraining.from_checkpoint(tmp_path / "phase1.safetensors")
    assert {"config", "answers", "init", "history"} <= set(metadata)
    assert metadata["history"] == [{"phase": 1, "mode": mode, "summary": summary}]
    assert summary["steps"] == 12 and summary["mode"] == mode
    modes = {h["mode"] for h in history(tmp_path)}
    assert modes == ({"single", "two"} if mode == "mixed" else {mode})
    # the weights moved away from the initial checkpoint
    initial, _ = SemVLPForPreTraining.from_checkpoint(world["root"] / "phase0.safetensors")
    assert any(not torch.equal(a, b) for a, b in zip(initial.state_dict().values(), trained.state_dict().values()))
    assert not (tmp_path / "phase1.safetensors.partial").exists()


def test_same_seed_gives_identical_losses(world, tmp_path):
    phase(world, tmp_path / "a", settings("mixed"))
    phase(world, tmp_path / "b", settings("mixed"))
    assert [h["loss_total"] for h in history(tmp_path / "a")] == [h["loss_total"] for h in history(tmp_path / "b")]


def test_loss_decreases_over_a_longer_phase(world, tmp_path):
    phase(world, tmp_path, settings("single", steps=60, checkpoint_every=100))
    losses = [h["loss_total"] for h in history(tmp_path)]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


@pytest.mark.parametrize("itm_sources", [("coco_captions",), ("coco_captions", "vqa")])
def test_only_sentences_of_the_itm_sources_get_matching_labels(world, itm_sources):
    root = world["root"]
    records = read_corpus(root / "corpus.jsonl")
    bank = RegionBank({"coco": root / "coco.h5"}, box_dim=4)
    batches = PretrainBatches(records, AnswerTable.load(root / "answers.json"), bank, load_tokenizer(root / "tokenizer"),
                              PhaseSettings(**{**asdict(settings()), "batch_size": 64, "itm_sources": itm_sources}))
    labels, sources = [], []
    for step in range(4):
        # replay the batch's draws: the records picked are the first draw of the step's generator
        picks = torch.randint(len(records), (64,), generator=batches.generator(step)).tolist()
        labels += batches(step)["itm_labels"].tolist()
        sources += [records[i].source for i in picks]
    by_source = {source: {label for label, s in zip(labels, sources) if s == source} for source in set(sources)}
    for source, seen in by_source.items():
        assert seen == ({0, 1} if source in itm_sources else {-1}), source


def test_phase_logs_matching_accuracy(world, tmp_path):
    summary = phase(world, tmp_path, settings("single"))
    accuracies = [h["itm_accuracy"] for h in history(tmp_path) if "itm_accuracy" in h]
    assert accuracies and all(0.0 <= a <= 1.0 for a in accuracies)
    assert 0.0 <= summary["mean_last10_itm_accuracy"] <= 1.0
    # the grounding diagnostic of the final model, in both modes (the trained one and the other)
    for mode in ("single", "two"):
        assert 0.0 <= summary[f"grounding_{mode}_itm_accuracy"] <= 1.0
        assert summary[f"grounding_{mode}_mlm_loss_own_image"] > 0


def phase_process(world, out_dir: Path, steps: int) -> subprocess.Popen:
    """A phase in its own process, one thread (a killed run and its reference must add up alike)."""
    out_dir.mkdir(exist_ok=True)
    script = (
        "import sys; sys.path.insert(0, %r); from pathlib import Path; from test_pretrain import phase, settings;"
        "phase({'root': Path(%r)}, Path(%r), settings('two', steps=%d, checkpoint_every=8))"
        % (str(Path(__file__).parent), str(world["root"]), str(out_dir), steps)
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_killed_phase_resumes_to_the_same_final_loss(world, tmp_path):
    steps = 40
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    assert phase_process(world, uninterrupted, steps).wait(timeout=600) == 0

    proc = phase_process(world, killed, steps)
    partial = killed / "phase1.safetensors.partial"
    kill_once_written(proc, partial)
    assert partial.exists(), "the phase finished or failed before its first periodic checkpoint"
    assert not (killed / "phase1.safetensors").exists()

    assert phase_process(world, killed, steps).wait(timeout=600) == 0
    summary = json.loads((killed / "phase1.metrics.json").read_text())["summary"]
    assert summary["resumed_from_step"] > 0
    assert history(killed)[-1]["loss_total"] == history(uninterrupted)[-1]["loss_total"]
    assert [h["loss_total"] for h in history(killed)] == [h["loss_total"] for h in history(uninterrupted)]
    assert not partial.exists()


def test_a_partial_checkpoint_of_other_settings_is_ignored(world, tmp_path):
    phase(world, tmp_path, settings("single", steps=8, checkpoint_every=4))
    reference = history(tmp_path)
    # a stale partial from a run with another mode must not be resumed
    torch.save({"settings": asdict(settings("two")), "previous": "elsewhere", "step": 4}, tmp_path / "phase1.safetensors.partial")
    summary = phase(world, tmp_path, settings("single", steps=8, checkpoint_every=4))
    assert summary["resumed_from_step"] == 0
    assert [h["loss_total"] for h in history(tmp_path)] == [h["loss_total"] for h in reference]


def test_ddp_two_processes_match_one_process_at_the_same_global_batch(world, tmp_path):
    """torchrun with 2 gloo processes (each half of the batch) against 1 process on the whole batch."""
    root = world["root"]
    without_dropout(root / "phase0.safetensors", tmp_path / "phase0.safetensors")  # masks differ per process by design
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"nproc{nproc}"
        out.mkdir()
        args = dict(
            previous_checkpoint=str(tmp_path / "phase0.safetensors"), out_checkpoint=str(out / "phase1.safetensors"),
            metrics_path=str(out / "phase1.metrics.json"), corpus_path=str(root / "corpus.jsonl"),
            answers_path=str(root / "answers.json"), tokenizer_dir=str(root / "tokenizer"),
            feature_paths={"coco": str(root / "coco.h5")}, settings=asdict(settings("mixed", steps=10, checkpoint_every=100)),
        )
        (out / "args.json").write_text(json.dumps(args))
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "semvlp.pretrain", str(out / "args.json")],
            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs[nproc] = [h["loss_total"] for h in history(out)]
    one, two = np.array(runs[1]), np.array(runs[2])
    # the same function of the same batches; only the order of floating-point sums differs
    np.testing.assert_allclose(two, one, rtol=1e-4)


def test_initial_checkpoint_from_a_real_bert_checkpoint(world, tmp_path):
    """model.init = a local BERT-family directory: its sizes, weights and vocabulary are used."""
    from test_model import minilm_dir

    root = world["root"]
    report = init_checkpoint(
        tmp_path / "phase0.safetensors",
        model_settings={"init": str(minilm_dir()), "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                        "intermediate_size": 64, "cross_layers": 1, "box_dim": 4, "dropout": 0.1, "max_text_length": 16,
                        "type_vocab_size": 0, "init_scheme": "pytorch"},
        tokenizer_dir=minilm_dir(),
        answers_path=root / "answers.json",
        feature_paths={"coco": root / "coco.h5"},
        seed=0,
    )
    assert report["init"] == str(minilm_dir()) and report["bert_loaded"] > 0 and report["bert_fresh"] > 0
    model, _ = SemVLPForPreTraining.from_checkpoint(tmp_path / "phase0.safetensors")
    assert model.config.hidden_size == 384 and model.config.num_layers == 6  # the checkpoint's sizes


def test_workers_and_rank_rows_give_the_same_batches(world):
    """A step's batch is the same with 0 or 2 loader workers, and a rank's rows are exactly those rows
    of the batch one process builds."""
    root = world["root"]
    records = read_corpus(root / "corpus.jsonl")
    bank = RegionBank({"coco": root / "coco.h5"}, box_dim=4)
    batches = PretrainBatches(records, AnswerTable.load(root / "answers.json"), bank, load_tokenizer(root / "tokenizer"), settings("mixed"))
    steps = range(3, 9)
    device = torch.device("cpu")

    def collected(rows, settings):  # copies: a batch's region features are valid until the next is taken
        return [{k: v.clone() for k, v in batch.items()} for batch in batch_loader(batches, steps, rows, settings, device)]

    in_process = collected(slice(None), LoaderSettings(num_workers=0))
    in_workers = collected(slice(None), LoaderSettings(num_workers=2, prefetch_factor=1))
    rank1 = collected(slice(1, None, 2), LoaderSettings(num_workers=0))
    assert len(in_process) == len(in_workers) == len(rank1) == len(steps)
    for whole, built_elsewhere, odd in zip(in_process, in_workers, rank1):
        assert whole.keys() == built_elsewhere.keys() == odd.keys()
        for name, values in whole.items():
            assert torch.equal(values, built_elsewhere[name]), name
            assert torch.equal(values[1::2], odd[name]), name
        assert whole["region_feats"].dtype == torch.float32  # this store's dtype (the writer's float32)
    assert any(not torch.equal(a["region_feats"], b["region_feats"]) for a, b in zip(in_process, in_process[1:]))


def test_under_torchrun_each_rank_reads_only_its_rows(world, tmp_path):
    """2 gloo processes: each rank's feature reads are half of the batch rows, in loader workers too."""
    root = world["root"]
    args = dict(
        previous_checkpoint=str(root / "phase0.safetensors"), out_checkpoint=str(tmp_path / "phase1.safetensors"),
        metrics_path=str(tmp_path / "phase1.metrics.json"), corpus_path=str(root / "corpus.jsonl"),
        answers_path=str(root / "answers.json"), tokenizer_dir=str(root / "tokenizer"),
        feature_paths={"coco": str(root / "coco.h5")}, settings=asdict(settings("single", steps=6, checkpoint_every=100)),
        loader={"num_workers": 1, "prefetch_factor": 2},
    )
    (tmp_path / "args.json").write_text(json.dumps(args))
    # counts the rows every FeatureReader.gather call reads, in the rank and in its loader worker, until
    # the end-of-phase diagnostic (rank 0 alone reads its sample)
    (tmp_path / "counting.py").write_text(
        "import os, sys\n"
        "from pathlib import Path\n"
        "from semvlp import features, pretrain\n"
        "log = Path(sys.argv[2]) / f\"reads{os.environ['RANK']}.txt\"\n"
        "gather = features.FeatureReader.gather\n"
        "def counted(self, rows, out):\n"
        "    with open(log, 'a') as f:\n"
        "        f.write(f'{len(rows)}\\n')\n"
        "    return gather(self, rows, out)\n"
        "features.FeatureReader.gather = counted\n"
        "grounding = pretrain._grounding\n"
        "def uncounted(*args, **kwargs):\n"
        "    features.FeatureReader.gather = gather\n"
        "    return grounding(*args, **kwargs)\n"
        "pretrain._grounding = uncounted\n"
        "pretrain.main([sys.argv[1]])\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tmp_path / "counting.py"), str(tmp_path / "args.json"), str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        reads = [int(n) for n in (tmp_path / f"reads{rank}.txt").read_text().split()]
        assert reads == [4] * 6, (rank, reads)  # 6 steps of batch 8, 4 rows per rank


def test_gradient_accumulation_matches_the_whole_batch(world, tmp_path):
    """Micro-batches of 2 x 4 rows step like one batch of 8: each term's mean is the whole batch's."""
    root = world["root"]
    without_dropout(root / "phase0.safetensors", tmp_path / "phase0.safetensors")  # masks differ with micro-batch shapes
    runs = {}
    for parts in (1, 2):
        out = tmp_path / f"parts{parts}"
        run_phase(
            previous_checkpoint=tmp_path / "phase0.safetensors", out_checkpoint=out / "phase1.safetensors", metrics_path=out / "phase1.metrics.json",
            corpus_path=root / "corpus.jsonl", answers_path=root / "answers.json", tokenizer_dir=root / "tokenizer",
            feature_paths={"coco": root / "coco.h5"},
            settings=PhaseSettings(**{**asdict(settings("mixed", steps=10, checkpoint_every=100)), "accumulation_steps": parts}),
        )
        runs[parts] = [h["loss_total"] for h in history(out)]
    np.testing.assert_allclose(runs[2], runs[1], rtol=1e-4)


def test_a_batch_that_does_not_split_is_refused(world, tmp_path):
    with pytest.raises(ValueError, match="batch size 8 does not split over 1 processes x 3 accumulation steps"):
        phase(world, tmp_path, PhaseSettings(**{**asdict(settings()), "accumulation_steps": 3}))
    with pytest.raises(ValueError, match="num_workers >= 0"):
        LoaderSettings(num_workers=-1)


def test_tokenized_text_gives_what_the_tokenizer_gives_on_real_captions():
    """Conceptual Captions (real excerpt) through a real BERT vocabulary, truncated at 12: the
    tokenise-once arrays give exactly the per-batch tokenizer call's ids and masks."""
    from test_model import minilm_dir

    from conftest import REPO
    from semvlp.batching import TokenizedText, encode_text

    excerpt = REPO.parent / "shared" / "realdata" / "conceptual_captions" / "Validation_GCC-1.1.0-Validation.first3000.tsv"
    if not excerpt.is_file():
        pytest.skip(f"no real excerpt at {excerpt}")
    captions = [line.split("\t")[0] for line in excerpt.read_text(encoding="utf-8").splitlines()[:600]]
    tokenizer = load_tokenizer(minilm_dir())
    text = TokenizedText(tokenizer, captions, 12, chunk=256)
    rows = np.random.default_rng(0).integers(0, len(captions), 64)
    expected = encode_text(tokenizer, [captions[i] for i in rows], 12)
    got = text.batch(rows)
    for name in ("input_ids", "text_mask", "special_tokens_mask"):
        assert torch.equal(got[name], expected[name]), name
    assert (text.lengths == 12).any() and (text.lengths < 12).any()  # some truncated, some padded
