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
from semvlp.tasks.common import Encoder, TaskSettings, autocast, batches_of, device_of, resume_point, task_info, train

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


def build_model(encoder: Encoder, info: dict) -> RetrievalModel:
    return RetrievalModel(encoder)


def predict(model: RetrievalModel, info: dict, files, split: str, bank: RegionBank, tokenizer, out_dir) -> Path:
    """scores_{split}.npy: every caption of the split (rows, dataset order) against every image."""
    scores = score_split(model, files["dataset"], split, bank, tokenizer, info["max_text_length"])
    path = Path(out_dir) / f"scores_{split}.npy"
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        np.save(file, scores)  # a file object: np.save would add ".npy" to a temporary name
    return path


def evaluate(files, split: str, scores_path, info: dict) -> dict[str, float]:
    return evaluate_retrieval(files["dataset"], split, scores_path)


def run(
    checkpoint,
    files,
    features_path,
    tokenizer,
    settings: TaskSettings,
    out_dir,
    job=None,
    *,
    negatives: int,
    caption_negatives: int,
    hard_negatives: bool,
    candidate_pool: int,
    hard_negatives_from_epoch: int,
):
    path = files["dataset"]
    images = load_flickr30k(path, settings.train_split)
    captions = [(caption, i) for i, image in enumerate(images) for caption in image.captions]
    captions = captions[: settings.max_train_examples]
    mining = dict(
        negatives=negatives, caption_negatives=caption_negatives, hard_negatives=hard_negatives,
        candidate_pool=candidate_pool, hard_negatives_from_epoch=hard_negatives_from_epoch,
    )
    info = task_info("retrieval", settings, checkpoint, len(captions), **mining)
    encoder = Encoder.from_checkpoint(checkpoint, settings.mode)
    bank = RegionBank({IMAGE_SET: features_path}, box_dim=encoder.config.box_dim)
    model = build_model(encoder, info)
    pair_inputs = PairInputs(bank, tokenizer, settings.max_text_length, [image.img_id for image in images])
    generator = torch.Generator().manual_seed(settings.seed + 7)
    steps_per_epoch = (len(captions) + settings.batch_size - 1) // settings.batch_size

    def other_images(image: int, count: int) -> list[int]:
        return draw_excluding(len(images), count, lambda i: i == image, generator)

    def other_captions(image: int, count: int) -> list[int]:
        return draw_excluding(len(captions), count, lambda c: captions[c][1] == image, generator)

    def hardest(pools: list[list[tuple[str, int]]], count: int) -> list[list[int]]:
        """Positions of the `count` best-scoring (text, image) pairs of each pool, all scored in one pass."""
        flat = [pair for pool in pools for pair in pool]
        was_training = model.training
        model.eval()  # score candidates as the model ranks at test time (no dropout)
        with torch.no_grad():
            scores = model(pair_inputs([text for text, _ in flat], [image for _, image in flat]))
        model.train(was_training)
        return [s.topk(min(count, len(s))).indices.tolist() for s in scores.split([len(pool) for pool in pools])]

    def negatives_for(chunk, step: int) -> tuple[list[list[int]], list[list[int]]]:
        """Per (caption, image) of the chunk: negative image indices, negative caption indices."""
        mine = hard_negatives and step // steps_per_epoch >= hard_negatives_from_epoch
        image_pools = [other_images(image, candidate_pool if mine else negatives) for _, image in chunk]
        caption_pool = (candidate_pool if mine else caption_negatives) if caption_negatives else 0
        caption_pools = [other_captions(image, caption_pool) for _, image in chunk]
        if not mine:
            return image_pools, caption_pools
        pairs = [[(text, i) for i in pool] for (text, _), pool in zip(chunk, image_pools)]
        pairs += [[(captions[c][0], image) for c in pool] for (_, image), pool in zip(chunk, caption_pools)]
        best = hardest(pairs, max(negatives, caption_negatives))
        image_best, caption_best = best[: len(chunk)], best[len(chunk) :]
        return (
            [[pool[k] for k in top[:negatives]] for pool, top in zip(image_pools, image_best)],
            [[pool[k] for k in top[:caption_negatives]] for pool, top in zip(caption_pools, caption_best)],
        )

    def loss_of_batch(chunk, step):
        image_negatives, text_negatives = negatives_for(chunk, step)
        texts = [text for text, _ in chunk]
        image_ids = [image for _, image in chunk]
        for (text, image), others in zip(chunk, image_negatives):
            others = padded(others, negatives, image)  # tiny splits: fewer images than negatives
            texts += [text] * negatives
            image_ids += others
        for (text, image), others in zip(chunk, text_negatives):
            texts += padded([captions[c][0] for c in others], caption_negatives, text)
            image_ids += [image] * caption_negatives
        scores = model(pair_inputs(texts, image_ids))
        positive, by_image, by_caption = scores.split([len(chunk), len(chunk) * negatives, len(chunk) * caption_negatives])
        target = torch.zeros(len(chunk), dtype=torch.long, device=scores.device)
        images_ranked = torch.cat([positive[:, None], by_image.view(len(chunk), negatives)], dim=1)  # [B, 1 + negatives]
        loss = nn.functional.cross_entropy(images_ranked, target)
        if caption_negatives:
            captions_ranked = torch.cat([positive[:, None], by_caption.view(len(chunk), caption_negatives)], dim=1)
            loss = (loss + nn.functional.cross_entropy(captions_ranked, target)) / 2
        return loss

    resume = resume_point(out_dir, checkpoint, task="retrieval", **mining)
    losses = train(model, captions, loss_of_batch, settings, job, desc="retrieval", generators={"negatives": generator}, **resume)
    results = {split: evaluate(files, split, predict(model, info, files, split, bank, tokenizer, out_dir), info) for split in settings.eval_splits}
    return {"train_loss_last": losses[-1], "num_train": len(captions)}, results, model, info


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
