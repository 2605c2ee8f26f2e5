"""NLVR2: each image of the pair encoded with the statement, pooled outputs concatenated, binary head."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from semvlp.batching import RegionBank, encode_text
from semvlp.data.formats import load_nlvr2
from semvlp.io import write_text
from semvlp.metrics import check_nlvr2_predictions, evaluate_nlvr2
from semvlp.tasks.common import (
    Encoder, TaskSettings, autocast, batches_of, classifier_head, device_of, resume_point, task_info, train,
)

IMAGE_SET = "nlvr2"


class NLVR2Model(nn.Module):
    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder
        self.head = classifier_head(2 * encoder.hidden_size, 2 * encoder.hidden_size, 2)

    def forward(self, left_batch, right_batch) -> torch.Tensor:
        pooled = torch.cat([self.encoder(left_batch).pooled, self.encoder(right_batch).pooled], dim=-1)  # [B, 2H]
        return self.head(pooled)  # [B, 2]


def build_model(encoder: Encoder, info: dict) -> NLVR2Model:
    return NLVR2Model(encoder)


def pair_batches(bank: RegionBank, tokenizer, max_text_length: int):
    """Model inputs (left image, right image, each with the statement) of a chunk of examples."""

    def make_batches(chunk):
        text = encode_text(tokenizer, [e.sentence for e in chunk], max_text_length)
        left = bank.batch([(IMAGE_SET, e.left_img_id) for e in chunk])
        right = bank.batch([(IMAGE_SET, e.right_img_id) for e in chunk])
        left.update(text)
        right.update(text)
        return left, right

    return make_batches


def predict(model: NLVR2Model, info: dict, files, split: str, bank: RegionBank, tokenizer, out_dir) -> Path:
    """predictions_{split}.csv in the official format (identifier,True|False); needs no labels."""
    make_batches = pair_batches(bank, tokenizer, info["max_text_length"])
    lines = []
    with torch.no_grad(), autocast(device_of(model)):
        for chunk in batches_of(load_nlvr2(files[f"{split}_data"]), 256):
            best = model(*make_batches(chunk)).argmax(-1).tolist()
            lines += [f"{e.identifier},{'True' if b else 'False'}" for e, b in zip(chunk, best)]
    path = Path(out_dir) / f"predictions_{split}.csv"
    write_text(path, "\n".join(lines) + "\n")
    return path


def evaluate(files, split: str, predictions_path, info: dict) -> dict[str, float]:
    """Accuracy and consistency; for a split without labels (the hidden test) the local check."""
    if all(e.label is None for e in load_nlvr2(files[f"{split}_data"])):
        return check_nlvr2_predictions(files[f"{split}_data"], predictions_path)
    return evaluate_nlvr2(files[f"{split}_data"], predictions_path)


def run(checkpoint, files, features_path, tokenizer, settings: TaskSettings, out_dir, job=None):
    examples = [e for e in load_nlvr2(files[f"{settings.train_split}_data"]) if e.label is not None]
    examples = examples[: settings.max_train_examples]
    info = task_info("nlvr2", settings, checkpoint, len(examples))
    encoder = Encoder.from_checkpoint(checkpoint, settings.mode)
    bank = RegionBank({IMAGE_SET: features_path}, box_dim=encoder.config.box_dim)
    model = build_model(encoder, info)
    make_batches = pair_batches(bank, tokenizer, settings.max_text_length)

    def loss_of_batch(chunk, step):
        logits = model(*make_batches(chunk))
        labels = torch.tensor([int(e.label) for e in chunk], device=logits.device)
        return nn.functional.cross_entropy(logits, labels)

    losses = train(model, examples, loss_of_batch, settings, job, desc="nlvr2", **resume_point(out_dir, checkpoint, task="nlvr2"))
    results = {split: evaluate(files, split, predict(model, info, files, split, bank, tokenizer, out_dir), info) for split in settings.eval_splits}
    return {"train_loss_last": losses[-1], "num_train": len(examples)}, results, model, info
