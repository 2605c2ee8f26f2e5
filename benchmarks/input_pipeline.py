"""Benchmark: the pre-training batch path at paper shape (36 regions x 2048-d float16, batch 256).

Writes once, into --cache-dir, a sharded feature store of N images (8 shard files and the store index
that `index_regions` writes), a caption corpus of 5 sentences per image and a WordPiece vocabulary.
Then, with the page cache warm, times the batches of --steps steps as a phase's loader delivers them
to the training loop (`semvlp.pretrain.batch_loader` over `PretrainBatches`: image-text mismatches,
region gather through the store's memory maps, box geometry, tokenisation, token and region masks,
targets) with --workers DataLoader worker processes (0: built in this process). Features stay float16;
zeroing the masked regions happens on the training device and is not timed here.

Figures (samples/s):
* samples_per_s: the batches the training loop receives, with `workers` worker processes;
* ceiling_samples_per_s: a gather of the same bytes from an in-memory float16 array in this process;
* h200_need_samples_per_s: what one H200 consumes at 40 % of 989 TFLOP/s on the base-size step,
  33.6 GFLOP per sample forward + backward (benchmarks/train_throughput.py --sizes base: 1075.8 GFLOP
  per step of 32 at 20 words and 36 regions).

    python benchmarks/input_pipeline.py --images 4000 --batch-size 256 --workers 2

The last line is one JSON object with these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from semvlp.batching import RegionBank
from semvlp.data.answers import AnswerTable
from semvlp.data.corpus import Corpus, CorpusRecord
from semvlp.features import FeatureWriter, RegionRecord, write_store_index
from semvlp.loader import LoaderSettings
from semvlp.pretrain import PhaseSettings, PretrainBatches, batch_loader
from semvlp.tokenization import load_tokenizer, train_wordpiece

BOXES, DIM, SHARDS = 36, 2048, 8
GFLOP_PER_SAMPLE = 1075.8 / 32
H200_NEED = 0.4 * 989e12 / (GFLOP_PER_SAMPLE * 1e9)
WORDS = "a the small large red green blue yellow circle square triangle left right of on next to near above below".split()


def prepare(folder: Path, num_images: int) -> Path:
    """The store index over SHARDS shard files (written once per size)."""
    index = folder / f"store{num_images}.h5"
    if index.is_file():
        return index
    rng = np.random.default_rng(0)
    shards = []
    for shard in range(SHARDS):
        rows = list(range(shard, num_images, SHARDS))
        path = folder / f"store{num_images}" / f"shard{shard}.h5"
        with FeatureWriter(path, num_images=len(rows), max_boxes=BOXES, feature_dim=DIM, provenance={"shard": shard}) as writer:
            for i, image in enumerate(rows):
                x1 = rng.uniform(0, 300, (BOXES, 2)).astype(np.float32)
                writer.write(i, RegionRecord(
                    img_id=f"img{image:07d}", img_h=480, img_w=640, boxes=np.concatenate([x1, x1 + 100], 1),
                    features=rng.random((BOXES, DIM), np.float32) * 4, obj_ids=rng.integers(0, 1600, BOXES),
                    obj_confs=rng.random(BOXES, np.float32), attr_ids=rng.integers(0, 400, BOXES),
                    attr_confs=rng.random(BOXES, np.float32),
                ))
        shards.append(path)
    write_store_index(shards, index)
    return index


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (0: in this process)")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/semvlp-bench"))
    args = parser.parse_args(argv)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    index = prepare(args.cache_dir, args.images)

    rng = np.random.default_rng(1)
    sentences = [" ".join(rng.choice(WORDS, int(rng.integers(6, 15)))) for _ in range(5 * args.images)]
    records = Corpus.from_records([CorpusRecord("coco", f"img{i // 5:07d}", s, None, "coco_captions") for i, s in enumerate(sentences)])
    vocab = args.cache_dir / "tokenizer"
    if not (vocab / "vocab.txt").is_file():
        train_wordpiece(sentences[:2000], 200, vocab)
    bank = RegionBank({"coco": index}, box_dim=4)
    settings = PhaseSettings(
        mode="single", index=1, steps=args.steps, batch_size=args.batch_size, lr=1e-4, warmup_ratio=0.1,
        weight_decay=0.01, checkpoint_every=1000, mixed_single_ratio=0.5, text_mask_prob=0.15,
        region_mask_prob=0.15, itm_mismatch_ratio=0.5, max_text_length=20, seed=0, accumulation_steps=1,
        itm_sources=("coco_captions",),
    )
    batches = PretrainBatches(records, AnswerTable([]), bank, load_tokenizer(vocab), settings)
    for step in range(3):  # warm the page cache
        batches(step)
    loader = batch_loader(batches, range(args.steps + 2 * args.workers), slice(None), LoaderSettings(num_workers=args.workers), torch.device("cpu"))
    batches_in = iter(loader)
    for _ in range(2 * args.workers):  # timed once every worker has started and delivered
        next(batches_in)
    tic = time.perf_counter()
    for batch in batches_in:
        assert batch["region_feats"].shape[0] == args.batch_size
    samples_per_s = args.steps * args.batch_size / (time.perf_counter() - tic)

    memory = bank.readers["coco"].read_rows(range(args.images))["features"]  # (N, 36, 2048) float16
    out = np.empty((args.batch_size, BOXES, DIM), np.float16)
    tic = time.perf_counter()
    for _ in range(args.steps):
        np.take(memory, rng.integers(args.images, size=args.batch_size), axis=0, out=out, mode="clip")
    ceiling = args.steps * args.batch_size / (time.perf_counter() - tic)

    print(f"pre-training batch path, {args.images} images x {BOXES} x {DIM} float16 in {SHARDS} shards, batch {args.batch_size}")
    print(f"  real batch path, {args.workers} workers  : {samples_per_s:10,.0f} samples/s")
    print(f"  in-memory float16 gather    : {ceiling:10,.0f} samples/s (ceiling)")
    print(f"  one H200 at 40 % MFU needs  : {H200_NEED:10,.0f} samples/s")
    print(f"  cpu: {os.cpu_count()} cores; reproduce: python benchmarks/input_pipeline.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    print(json.dumps({"samples_per_s": round(samples_per_s), "workers": args.workers, "ceiling_samples_per_s": round(ceiling),
                      "h200_need_samples_per_s": round(H200_NEED), "images": args.images, "batch_size": args.batch_size}))


if __name__ == "__main__":
    main()
