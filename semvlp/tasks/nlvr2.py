"""NLVR2: each image of the pair encoded with the statement, pooled outputs concatenated, binary head."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from semvlp.batching import encode_text
from semvlp.data.formats import load_nlvr2
from semvlp.io import write_text
from semvlp.metrics import check_nlvr2_predictions, evaluate_nlvr2
from semvlp.tasks.common import Encoder, Task, autocast, batches_of, classifier_head, device_of


class NLVR2Model(nn.Module):
    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder
        self.head = classifier_head(2 * encoder.hidden_size, 2 * encoder.hidden_size, 2)

    def forward(self, left_batch, right_batch) -> torch.Tensor:
        pooled = torch.cat([self.encoder(left_batch).pooled, self.encoder(right_batch).pooled], dim=-1)  # [B, 2H]
        return self.head(pooled)  # [B, 2]


class NLVR2(Task):
    name = "nlvr2"

    def training_examples(self):
        examples = [e for split in self.settings.train_splits for e in load_nlvr2(self.files[f"{split}_data"]) if e.label is not None]
        return examples, {}

    def build_model(self, encoder, info) -> NLVR2Model:
        return NLVR2Model(encoder)

    def pair_batches(self, examples):
        """Model inputs (left image, right image, each with the statement) of examples."""
        text = encode_text(self.tokenizer, [e.sentence for e in examples], self.settings.max_text_length)
        left = self.bank.batch([(self.spec.image_set, e.left_img_id) for e in examples])
        right = self.bank.batch([(self.spec.image_set, e.right_img_id) for e in examples])
        left.update(text)
        right.update(text)
        return left, right

    def loss(self, model: NLVR2Model, examples, step: int) -> torch.Tensor:
        logits = model(*self.pair_batches(examples))
        labels = torch.tensor([int(e.label) for e in examples], device=logits.device)
        return nn.functional.cross_entropy(logits, labels)

    def predict(self, model, info, split, out_dir) -> Path:
        """predictions_{split}.csv in the official format (identifier,True|False); needs no labels."""
        lines = []
        with torch.no_grad(), autocast(device_of(model)):
            for chunk in batches_of(load_nlvr2(self.files[f"{split}_data"]), 256):
                best = model(*self.pair_batches(chunk)).argmax(-1).tolist()
                lines += [f"{e.identifier},{'True' if b else 'False'}" for e, b in zip(chunk, best)]
        path = Path(out_dir) / f"predictions_{split}.csv"
        write_text(path, "\n".join(lines) + "\n")
        return path

    def evaluate(self, split, predictions_path, info):
        """Accuracy and consistency; for a split without labels (the hidden test) the local check."""
        data = self.files[f"{split}_data"]
        if all(e.label is None for e in load_nlvr2(data)):
            return check_nlvr2_predictions(data, predictions_path)
        return evaluate_nlvr2(data, predictions_path)


TASK = NLVR2
