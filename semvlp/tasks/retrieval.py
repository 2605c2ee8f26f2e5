"""Flickr30K retrieval: rank image-caption pairs with the matching head.

Training: for each caption, its image against `negatives` other images, softmax cross-entropy over the
group. With `hard_negatives`, from epoch `hard_negatives_from_epoch` on (0-based; before it the model's
scores carry no information, so mining would only cost time) the negatives are the highest-scoring of
`candidate_pool` random other images, scored by the current model in one no-grad pass per batch.
Evaluation scores every caption against every image of the split (a captions x images matrix, saved as
.npy) and reports R@1/5/10 both ways.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from semvlp.batching import RegionBank, encode_text
from semvlp.data.formats import load_flickr30k
from semvlp.io import atomic_path
from semvlp.metrics import evaluate_retrieval
from semvlp.tasks.common import Encoder, TaskSettings, batches_of, train

IMAGE_SET = "flickr30k"
EVAL_PAIRS_PER_BATCH = 512
REGION_KEYS = ("region_feats", "region_geom", "region_mask")
TEXT_KEYS = ("input_ids", "text_mask")


class RetrievalModel(nn.Module):
    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, batch) -> torch.Tensor:
        logits = self.encoder.model.itm_head(self.encoder(batch).pooled)  # [B, 2]
        return logits[:, 1] - logits[:, 0]  # [B] match score (log-odds)


class PairInputs:
    """Model inputs for (caption, image) pairs, each image's regions read from HDF5 once per call."""

    def __init__(self, bank: RegionBank, tokenizer, max_text_length: int, image_ids: list[str]):
        self.bank, self.tokenizer, self.max_text_length, self.image_ids = bank, tokenizer, max_text_length, image_ids

    def regions(self, image_indices: list[int]) -> dict[str, torch.Tensor]:
        row_of = {i: row for row, i in enumerate(sorted(set(image_indices)))}
        regions = self.bank.batch([(IMAGE_SET, self.image_ids[i]) for i in row_of])
        rows = torch.tensor([row_of[i] for i in image_indices])
        return {key: regions[key][rows] for key in REGION_KEYS}  # [P, R, ...]

    def __call__(self, texts: list[str], image_indices: list[int]) -> dict[str, torch.Tensor]:
        batch = self.regions(image_indices)
        batch.update(encode_text(self.tokenizer, texts, self.max_text_length))
        return batch


def run(
    checkpoint,
    files,
    features_path,
    tokenizer,
    settings: TaskSettings,
    out_dir,
    job=None,
    negatives: int = 3,
    hard_negatives: bool = True,
    candidate_pool: int = 8,
    hard_negatives_from_epoch: int = 1,
):
    out_dir = Path(out_dir)
    path = files["dataset"]
    images = load_flickr30k(path, settings.train_split)
    captions = [(caption, i) for i, image in enumerate(images) for caption in image.captions]
    captions = captions[: settings.max_train_examples]
    encoder = Encoder(checkpoint, settings.mode)
    bank = RegionBank({IMAGE_SET: features_path}, box_dim=encoder.config.box_dim)
    model = RetrievalModel(encoder)
    pair_inputs = PairInputs(bank, tokenizer, settings.max_text_length, [image.img_id for image in images])
    generator = torch.Generator().manual_seed(settings.seed + 7)
    steps_per_epoch = (len(captions) + settings.batch_size - 1) // settings.batch_size
    step = 0

    def random_others(positive: int, count: int) -> list[int]:
        drawn = torch.randperm(len(images), generator=generator)[: count + 1].tolist()
        return [i for i in drawn if i != positive][:count]

    def negatives_for(chunk) -> list[list[int]]:
        mine = hard_negatives and step // steps_per_epoch >= hard_negatives_from_epoch
        if not mine:
            return [random_others(positive, negatives) for _, positive in chunk]
        pools = [random_others(positive, candidate_pool) for _, positive in chunk]
        texts = [text for (text, _), pool in zip(chunk, pools) for _ in pool]
        was_training = model.training
        model.eval()  # score candidates as the model ranks at test time (no dropout)
        with torch.no_grad():
            scores = model(pair_inputs(texts, [i for pool in pools for i in pool])).split([len(p) for p in pools])
        model.train(was_training)
        return [[pool[i] for i in s.topk(min(negatives, len(pool))).indices.tolist()] for pool, s in zip(pools, scores)]

    def loss_of_batch(chunk):
        nonlocal step
        texts, groups = [], []
        for (text, positive), others in zip(chunk, negatives_for(chunk)):
            group = [positive] + others
            group += group[-1:] * (negatives + 1 - len(group))  # tiny splits: pad by repeating
            texts += [text] * (negatives + 1)
            groups += group
        step += 1
        scores = model(pair_inputs(texts, groups)).view(len(chunk), negatives + 1)  # [B, 1 + negatives]
        return nn.functional.cross_entropy(scores, torch.zeros(len(chunk), dtype=torch.long))

    losses = train(model, captions, loss_of_batch, settings, job, desc="retrieval")
    results = {}
    for split in settings.eval_splits:
        scores_path = out_dir / f"scores_{split}.npy"
        scores = score_split(model, path, split, bank, tokenizer, settings.max_text_length)
        with atomic_path(scores_path) as tmp, open(tmp, "wb") as file:
            np.save(file, scores)  # a file object: np.save would add ".npy" to a temporary name
        results[split] = evaluate_retrieval(path, split, scores_path)
    return {"train_loss_last": losses[-1], "num_train": len(captions)}, results


def score_split(model: RetrievalModel, path, split: str, bank: RegionBank, tokenizer, max_text_length: int) -> np.ndarray:
    """Match scores [captions, images] of every caption (dataset order) against every image of the split."""
    split_images = load_flickr30k(path, split)
    pair_inputs = PairInputs(bank, tokenizer, max_text_length, [image.img_id for image in split_images])
    texts = encode_text(tokenizer, [caption for image in split_images for caption in image.captions], max_text_length)
    lengths = texts["text_mask"].sum(dim=1)  # [captions]
    # captions of similar length share a batch, each batch cut to its longest: less padding to encode
    order = torch.argsort(lengths, stable=True)
    batches = [(rows, int(lengths[rows].max())) for rows in batches_of(order, EVAL_PAIRS_PER_BATCH)]
    scores = np.zeros((len(order), len(split_images)), np.float32)  # [captions, images]
    with torch.no_grad():
        for j in range(len(split_images)):
            image = pair_inputs.regions([j])  # [1, R, ...]: broadcast to every caption of a batch
            for rows, length in batches:
                batch = {key: texts[key][rows, :length] for key in TEXT_KEYS}
                batch.update({key: value.expand(len(rows), *value.shape[1:]) for key, value in image.items()})
                scores[rows.numpy(), j] = model(batch).numpy()
    return scores
