"""Retrieval scoring on the tiny run's real checkpoint, features and Karpathy-format split."""

from __future__ import annotations

import numpy as np
import torch

from semvlp.batching import RegionBank
from semvlp.data.formats import load_flickr30k
from semvlp.tasks.common import Encoder
from semvlp.tasks.retrieval import PairInputs, RetrievalModel, draw_excluding, padded, score_split
from semvlp.tokenization import load_tokenizer


def test_split_scores_equal_each_pair_scored_alone(tiny_run):
    """Length-sorted, broadcast evaluation batches give every (caption, image) pair its own score."""
    results = tiny_run.workdir / "results"
    dataset = next((results / "data").rglob("dataset_flickr30k.json"))
    model = RetrievalModel(Encoder.from_checkpoint(results / "pretrain" / "semvlp" / "phase2.safetensors", "single")).eval()
    bank = RegionBank({"flickr30k": results / "features" / "flickr30k.h5"}, box_dim=model.encoder.config.box_dim)
    tokenizer = load_tokenizer(results / "tokenizer")

    scores = score_split(model, dataset, "test", bank, tokenizer, max_text_length=24)

    images = load_flickr30k(dataset, "test")
    captions = [caption for image in images for caption in image.captions]
    assert scores.shape == (len(captions), len(images))
    pair_inputs = PairInputs(bank, tokenizer, 24, [image.img_id for image in images])
    alone = np.zeros_like(scores)
    with torch.no_grad():
        for row, caption in enumerate(captions):
            alone[row] = model(pair_inputs([caption] * len(images), list(range(len(images))))).numpy()
    np.testing.assert_allclose(scores, alone, atol=1e-5)
    assert scores.std() > 0  # the image changes the score: not a constant matrix


def test_pair_inputs_read_each_image_once_and_keep_pair_order(tiny_run):
    results = tiny_run.workdir / "results"
    bank = RegionBank({"flickr30k": results / "features" / "flickr30k.h5"}, box_dim=4)
    ids = list(bank.readers["flickr30k"].ids[:3])
    pair_inputs = PairInputs(bank, load_tokenizer(results / "tokenizer"), 24, ids)

    batch = pair_inputs(["a", "b", "c", "d"], [2, 0, 2, 1])

    one_by_one = [bank.batch([("flickr30k", ids[i])]) for i in (2, 0, 2, 1)]
    for key in ("region_feats", "region_geom", "region_mask"):
        assert torch.equal(batch[key], torch.cat([single[key] for single in one_by_one]))
    assert batch["input_ids"].shape[0] == 4


def test_negatives_are_distinct_and_never_excluded():
    generator = torch.Generator().manual_seed(0)
    caption_image = [i // 5 for i in range(50)]  # five captions per image, as in Flickr30K
    for _ in range(200):
        drawn = draw_excluding(50, 3, lambda c: caption_image[c] == 4, generator)
        assert len(drawn) == len(set(drawn)) == 3 and all(caption_image[c] != 4 for c in drawn)
    # fewer allowed indices than asked: all of them, once each
    assert sorted(draw_excluding(6, 8, lambda c: c in (1, 3), generator)) == [0, 2, 4, 5]
    assert draw_excluding(6, 0, lambda c: False, generator) == []
    assert padded([7, 9], 4, 0) == [7, 9, 9, 9] and padded([], 2, 5) == [5, 5]
