"""Flickr30K retrieval: rank image-caption pairs with the matching head.

Training ranks in both directions, as evaluation does: each caption's image against `negatives` other
images, and that image's match with the caption against `caption_negatives` captions of other images,
each group a softmax cross-entropy (the two averaged). Ranking images per caption alone leaves a
per-caption bias in the score unpunished, and then a few captions top every image in text retrieval.
With `hard_negatives`, from epoch `hard_negatives_from_epoch` on (0-based; before it the model's scores
carry no information, so mining would only cost time) the negatives are the highest-scoring of
`candidate_pool` random candidates, scored by the current model in one no-grad pass per batch.
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
from semvlp.tasks import task_spec
from semvlp.tasks.common import Encoder, Task, autocast, batches_of, device_of

IMAGE_SET = task_spec("retrieval").image_set
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


class Retrieval(Task):
    name = "retrieval"

    def training_examples(self):
        s = self.settings
        self.images = [image for split in s.train_splits for image in load_flickr30k(self.files["dataset"], split)]
        self.captions = [(caption, i) for i, image in enumerate(self.images) for caption in image.captions]
        self.pair_inputs = PairInputs(self.bank, self.tokenizer, s.max_text_length, [image.img_id for image in self.images])
        self.generators["negatives"] = self.negatives_generator = torch.Generator().manual_seed(s.seed + 7)
        # the caption list train() is given may be cut to max_train_examples; epochs count its steps
        self.steps_per_epoch = (len(self.captions[: s.max_train_examples]) + s.batch_size - 1) // s.batch_size
        return self.captions, {}

    def build_model(self, encoder, info) -> RetrievalModel:
        return RetrievalModel(encoder)

    def other_images(self, image: int, count: int) -> list[int]:
        return draw_excluding(len(self.images), count, lambda i: i == image, self.negatives_generator)

    def other_captions(self, image: int, count: int) -> list[int]:
        return draw_excluding(len(self.captions), count, lambda c: self.captions[c][1] == image, self.negatives_generator)

    def hardest(self, model: RetrievalModel, pools: list[list[tuple[str, int]]], count: int) -> list[list[int]]:
        """Positions of the `count` best-scoring (text, image) pairs of each pool, all scored in one pass."""
        flat = [pair for pool in pools for pair in pool]
        was_training = model.training
        model.eval()  # score candidates as the model ranks at test time (no dropout)
        with torch.no_grad():
            scores = model(self.pair_inputs([text for text, _ in flat], [image for _, image in flat]))
        model.train(was_training)
        return [s.topk(min(count, len(s))).indices.tolist() for s in scores.split([len(pool) for pool in pools])]

    def negatives_for(self, model: RetrievalModel, chunk, step: int) -> tuple[list[list[int]], list[list[int]]]:
        """Per (caption, image) of the chunk: negative image indices, negative caption indices."""
        s = self.settings
        mine = s.hard_negatives and step // self.steps_per_epoch >= s.hard_negatives_from_epoch
        image_pools = [self.other_images(image, s.candidate_pool if mine else s.negatives) for _, image in chunk]
        caption_pool = (s.candidate_pool if mine else s.caption_negatives) if s.caption_negatives else 0
        caption_pools = [self.other_captions(image, caption_pool) for _, image in chunk]
        if not mine:
            return image_pools, caption_pools
        pairs = [[(text, i) for i in pool] for (text, _), pool in zip(chunk, image_pools)]
        pairs += [[(self.captions[c][0], image) for c in pool] for (_, image), pool in zip(chunk, caption_pools)]
        best = self.hardest(model, pairs, max(s.negatives, s.caption_negatives))
        image_best, caption_best = best[: len(chunk)], best[len(chunk) :]
        return (
            [[pool[k] for k in top[: s.negatives]] for pool, top in zip(image_pools, image_best)],
            [[pool[k] for k in top[: s.caption_negatives]] for pool, top in zip(caption_pools, caption_best)],
        )

    def loss(self, model: RetrievalModel, chunk, step: int) -> torch.Tensor:
        negatives, caption_negatives = self.settings.negatives, self.settings.caption_negatives
        image_negatives, text_negatives = self.negatives_for(model, chunk, step)
        texts = [text for text, _ in chunk]
        image_ids = [image for _, image in chunk]
        for (text, image), others in zip(chunk, image_negatives):
            texts += [text] * negatives
            image_ids += padded(others, negatives, image)  # tiny splits: fewer images than negatives
        for (text, image), others in zip(chunk, text_negatives):
            texts += padded([self.captions[c][0] for c in others], caption_negatives, text)
            image_ids += [image] * caption_negatives
        scores = model(self.pair_inputs(texts, image_ids))
        positive, by_image, by_caption = scores.split([len(chunk), len(chunk) * negatives, len(chunk) * caption_negatives])
        target = torch.zeros(len(chunk), dtype=torch.long, device=scores.device)
        images_ranked = torch.cat([positive[:, None], by_image.view(len(chunk), negatives)], dim=1)  # [B, 1 + negatives]
        loss = nn.functional.cross_entropy(images_ranked, target)
        if caption_negatives:
            captions_ranked = torch.cat([positive[:, None], by_caption.view(len(chunk), caption_negatives)], dim=1)
            loss = (loss + nn.functional.cross_entropy(captions_ranked, target)) / 2
        return loss

    def predict(self, model, info, split, out_dir) -> Path:
        """scores_{split}.npy: every caption of the split (rows, dataset order) against every image."""
        scores = score_split(model, self.files["dataset"], split, self.bank, self.tokenizer, self.settings.max_text_length)
        path = Path(out_dir) / f"scores_{split}.npy"
        with atomic_path(path) as tmp, open(tmp, "wb") as file:
            np.save(file, scores)  # a file object: np.save would add ".npy" to a temporary name
        return path

    def evaluate(self, split, scores_path, info):
        return evaluate_retrieval(self.files["dataset"], split, scores_path)


TASK = Retrieval


def draw_excluding(population: int, count: int, excluded, generator: torch.Generator) -> list[int]:
    """Up to `count` distinct random indices below `population` for which `excluded(index)` is false."""
    drawn: list[int] = []
    if count == 0:
        return drawn
    # a few random draws usually suffice; permuting a 145k-caption split for every example would not be cheap
    for candidates in (torch.randint(population, (2 * count + 8,), generator=generator), torch.randperm(population, generator=generator)):
        for index in candidates.tolist():
            if index not in drawn and not excluded(index):
                drawn.append(index)
                if len(drawn) == count:
                    return drawn
    return drawn  # fewer allowed indices than `count`


def padded(items: list, size: int, fallback) -> list:
    """`items` repeated at its end (or `fallback` when empty) to `size` entries."""
    return items + ([items[-1]] if items else [fallback]) * (size - len(items))


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
    with torch.no_grad(), autocast(device_of(model)):
        for j in range(len(split_images)):
            image = pair_inputs.regions([j])  # [1, R, ...]: broadcast to every caption of a batch
            for rows, length in batches:
                batch = {key: texts[key][rows, :length] for key in TEXT_KEYS}
                batch.update({key: value.expand(len(rows), *value.shape[1:]) for key, value in image.items()})
                scores[rows.numpy(), j] = model(batch).float().cpu().numpy()
    return scores
