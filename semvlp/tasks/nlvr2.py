"""NLVR2: each image of the pair encoded with the statement, pooled outputs concatenated, binary head."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from semvlp.batching import RegionBank, encode_text
from semvlp.data.formats import load_nlvr2
from semvlp.io import write_text
from semvlp.metrics import evaluate_nlvr2
from semvlp.tasks.common import Encoder, TaskSettings, autocast, batches_of, classifier_head, device_of, resume_point, train

IMAGE_SET = "nlvr2"


class NLVR2Model(nn.Module):
    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder
        self.head = classifier_head(2 * encoder.hidden_size, 2 * encoder.hidden_size, 2)

    def forward(self, left_batch, right_batch) -> torch.Tensor:
        pooled = torch.cat([self.encoder(left_batch).pooled, self.encoder(right_batch).pooled], dim=-1)  # [B, 2H]
        return self.head(pooled)  # [B, 2]


def run(checkpoint, files, features_path, tokenizer, settings: TaskSettings, out_dir, job=None):
    out_dir = Path(out_dir)
    examples = [e for e in load_nlvr2(files[f"{settings.train_split}_data"]) if e.label is not None]
    examples = examples[: settings.max_train_examples]
    encoder = Encoder(checkpoint, settings.mode)
    bank = RegionBank({IMAGE_SET: features_path}, box_dim=encoder.config.box_dim)
    model = NLVR2Model(encoder)

    def make_batches(chunk):
        text = encode_text(tokenizer, [e.sentence for e in chunk], settings.max_text_length)
        left = bank.batch([(IMAGE_SET, e.left_img_id) for e in chunk])
        right = bank.batch([(IMAGE_SET, e.right_img_id) for e in chunk])
        left.update(text)
        right.update(text)
        return left, right

    def loss_of_batch(chunk, step):
        logits = model(*make_batches(chunk))
        labels = torch.tensor([int(e.label) for e in chunk], device=logits.device)
        return nn.functional.cross_entropy(logits, labels)

    losses = train(model, examples, loss_of_batch, settings, job, desc="nlvr2", **resume_point(out_dir, checkpoint, task="nlvr2"))
    results = {}
    for split in settings.eval_splits:
        path = files[f"{split}_data"]
        lines = []
        with torch.no_grad(), autocast(device_of(model)):
            for chunk in batches_of(load_nlvr2(path), 256):
                best = model(*make_batches(chunk)).argmax(-1).tolist()
                lines += [f"{e.identifier},{'True' if b else 'False'}" for e, b in zip(chunk, best)]
        predictions_path = out_dir / f"predictions_{split}.csv"
        write_text(predictions_path, "\n".join(lines) + "\n")
        results[split] = evaluate_nlvr2(path, predictions_path)
    return {"train_loss_last": losses[-1], "num_train": len(examples)}, results
