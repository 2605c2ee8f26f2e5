"""Flickr30K retrieval: rank image-caption pairs with the matching head.

Training: for each caption, its image against `negatives` other images, softmax cross-entropy over the
group. With `hard_negatives`, the negatives are the highest-scoring of a random candidate pool, scored
by the current model (mined every batch). Evaluation scores every caption against every image of the
split (a captions x images matrix, saved as .npy) and reports R@1/5/10 both ways.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from semvlp.batching import RegionBank, encode_text
from semvlp.data.formats import load_flickr30k
from semvlp.metrics import evaluate_retrieval
from semvlp.tasks.common import Encoder, TaskSettings, batches_of, train

IMAGE_SET = "flickr30k"
CANDIDATE_POOL = 16  # random candidates scored per caption when mining hard negatives


class RetrievalModel(nn.Module):
    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, batch) -> torch.Tensor:
        logits = self.encoder.model.itm_head(self.encoder(batch).pooled)  # [B, 2]
        return logits[:, 1] - logits[:, 0]  # [B] match score (log-odds)


def run(checkpoint, files, features_path, tokenizer, settings: TaskSettings, out_dir, job=None, negatives: int = 3, hard_negatives: bool = True):
    out_dir = Path(out_dir)
    path = files["dataset"]
    images = load_flickr30k(path, settings.train_split)
    captions = [(caption, i) for i, image in enumerate(images) for caption in image.captions]
    captions = captions[: settings.max_train_examples]
    image_ids = [image.img_id for image in images]
    encoder = Encoder(checkpoint, settings.mode)
    bank = RegionBank({IMAGE_SET: features_path}, box_dim=encoder.config.box_dim)
    model = RetrievalModel(encoder)
    generator = torch.Generator().manual_seed(settings.seed + 7)

    def score_pairs(texts: list[str], image_indices: list[int], ids: list[str]) -> torch.Tensor:
        batch = bank.batch([(IMAGE_SET, ids[i]) for i in image_indices])
        batch.update(encode_text(tokenizer, texts, settings.max_text_length))
        return model(batch)

    def pick_negatives(text: str, positive: int) -> list[int]:
        pool_size = CANDIDATE_POOL if hard_negatives else negatives
        pool = [i for i in torch.randperm(len(images), generator=generator)[: pool_size + 1].tolist() if i != positive][:pool_size]
        if not hard_negatives:
            return pool[:negatives]
        with torch.no_grad():
            scores = score_pairs([text] * len(pool), pool, image_ids)
        return [pool[i] for i in scores.topk(min(negatives, len(pool))).indices.tolist()]

    def loss_of_batch(chunk):
        texts, groups = [], []
        for text, positive in chunk:
            texts += [text] * (negatives + 1)
            group = [positive] + pick_negatives(text, positive)
            group += group[-1:] * (negatives + 1 - len(group))  # tiny splits: pad by repeating
            groups += group
        scores = score_pairs(texts, groups, image_ids).view(len(chunk), negatives + 1)  # [B, 1 + negatives]
        return nn.functional.cross_entropy(scores, torch.zeros(len(chunk), dtype=torch.long))

    losses = train(model, captions, loss_of_batch, settings, job, desc="retrieval")
    results = {}
    for split in settings.eval_splits:
        split_images = load_flickr30k(path, split)
        split_ids = [image.img_id for image in split_images]
        texts = [caption for image in split_images for caption in image.captions]
        scores = np.zeros((len(texts), len(split_images)), np.float32)  # [captions, images]
        with torch.no_grad():
            for j in range(len(split_images)):
                for rows in batches_of(list(range(len(texts))), 512):
                    scores[rows, j] = score_pairs([texts[r] for r in rows], [j] * len(rows), split_ids).numpy()
        scores_path = out_dir / f"scores_{split}.npy"
        scores_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = scores_path.with_name(f".tmp-{scores_path.name}")
        np.save(tmp, scores)
        tmp.replace(scores_path)
        results[split] = evaluate_retrieval(path, split, scores_path)
    return {"train_loss_last": losses[-1], "num_train": len(captions)}, results
