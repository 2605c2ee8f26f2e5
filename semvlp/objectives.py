"""Masking and the pre-training losses of SemVLP (masked LM, masked objects, image-text matching, image QA).

Conventions shared by every term: a negative label means "no target here"; a term whose batch has
no target is exactly 0 (still connected to the graph, so DistributedDataParallel sees every head
used) instead of the NaN a plain mean over nothing gives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from semvlp.model import PreTrainingOutput

IGNORE_INDEX = -100  # label of a text position without a masked-LM target (PyTorch's default ignore_index)

LOSS_NAMES: tuple[str, ...] = ("mlm", "obj_feat", "obj_label", "attr_label", "itm", "qa")


def mask_tokens(
    input_ids: torch.Tensor,
    special_tokens_mask: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's token masking: each non-special token is chosen with probability `prob`; a chosen token
    becomes [MASK] 80% of the time, a uniformly random vocabulary id 10%, and stays itself 10%.

    input_ids: [B, T] long. special_tokens_mask: [B, T] bool, True for [CLS], [SEP] and padding
    (what `BertTokenizerFast(..., padding=True, return_special_tokens_mask=True)` returns); those are
    never chosen. Returns (masked_ids [B, T], labels [B, T]) with labels = the original id at chosen
    positions and IGNORE_INDEX elsewhere. `generator` must live on input_ids' device.
    """
    device = input_ids.device
    eligible = ~special_tokens_mask.bool()
    chosen = (torch.rand(input_ids.shape, generator=generator, device=device) < prob) & eligible
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    action = torch.rand(input_ids.shape, generator=generator, device=device)  # [B, T] in [0, 1)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=device)
    masked_ids = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    masked_ids = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked_ids)
    return masked_ids, labels


def mask_regions(
    region_mask: torch.Tensor, *, prob: float = 0.15, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Choose each real region (region_mask [B, R] bool) with probability `prob`; returns masked [B, R] bool.

    The caller zeroes the chosen regions' features and keeps their originals as regression targets.
    """
    draw = torch.rand(region_mask.shape, generator=generator, device=region_mask.device)
    return (draw < prob) & region_mask.bool()


@dataclass
class LossWeights:
    """Weight of each pre-training term in the total."""

    mlm: float = 1.0
    obj_feat: float = 1.0
    obj_label: float = 1.0
    attr_label: float = 1.0
    itm: float = 1.0
    qa: float = 1.0


def _mean_over(per_item: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Sum of per-item losses over the items that count, divided by their number (0 when none count)."""
    counted = counted.to(per_item.dtype)
    return (per_item * counted).sum() / counted.sum().clamp(min=1)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """Per-item cross-entropy [...] of logits [..., K] against labels [...]; items not counted give 0."""
    safe_labels = torch.where(counted, labels, torch.full_like(labels, IGNORE_INDEX))
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # [items, K]
    per_item = F.cross_entropy(flat_logits, safe_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return per_item.view(labels.shape)


def _detector_label_loss(
    logits: torch.Tensor | None, labels: torch.Tensor | None, confs: torch.Tensor | None, masked: torch.Tensor
) -> torch.Tensor | None:
    """Cross-entropy on masked regions, each weighted by the detector's confidence in its label (LXMERT)."""
    if logits is None:
        return None
    counted = masked & (labels >= 0)
    per_region = _cross_entropy(logits, labels, counted) * confs.to(logits.dtype)  # [B, R]
    return _mean_over(per_region, counted)


def head_positions(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Where `pretraining_losses` reads the masked-LM and masked-object heads, as keyword arguments for
    `SemVLPForPreTraining.forward`, which then runs those two heads there alone (same losses, less work):

        output = model(**inputs, mode=mode, **head_positions(batch))

    Returns mlm_positions [B, T] bool (tokens with an MLM label) and object_positions [B, R] bool
    (masked real regions).
    """
    return {
        "mlm_positions": batch["mlm_labels"] >= 0,
        "object_positions": batch["masked_regions"].bool() & batch["region_mask"].bool(),
    }


def _positions_reader(
    positions: torch.Tensor | None, needed: torch.Tensor, name: str, what: str
) -> Callable[[torch.Tensor | None], torch.Tensor | None]:
    """A function that reads a per-position batch tensor ([B, L, ...]) at the positions of a head's outputs.

    positions: [B, L] bool where the model computed the head (None: everywhere); needed: [B, L] bool where
    a loss has a target. A target outside the computed positions has no prediction to compare with.
    """
    if positions is None:
        return lambda values: values
    if positions.shape != needed.shape:
        raise ValueError(f"{name} has shape {tuple(positions.shape)}, the batch's targets {tuple(needed.shape)}")
    if bool((needed & ~positions).any()):
        raise ValueError(f"the model was run with {name} that leave out a {what} with a target")
    return lambda values: None if values is None else values[positions]


def pretraining_losses(
    output: PreTrainingOutput, batch: dict[str, torch.Tensor], weights: LossWeights
) -> dict[str, torch.Tensor]:
    """The pre-training terms and their weighted `total` (a dict of scalar tensors).

    batch holds:
      mlm_labels [B, T] long (IGNORE_INDEX = none; see mask_tokens),
      masked_regions [B, R] bool (see mask_regions), region_mask [B, R] bool,
      target_feats [B, R, D] (the features before masking),
      obj_labels / attr_labels [B, R] long (-1 = none), obj_confs / attr_confs [B, R] float,
      itm_labels [B] long (1 = matched, 0 = mismatched, -1 = none),
      qa_labels [B] long (answer index, -1 = none).
    attr_labels/attr_confs may be left out when the model has no attribute head.
    The output may come from a forward pass given `head_positions(batch)` (or any `mlm_positions` /
    `object_positions` covering every MLM label / masked real region): the losses are the same.

    * mlm: cross-entropy over the vocabulary at positions with a label.
    * obj_feat: smooth-L1 (beta 1, LXMERT's choice, robust to the heavy-tailed ReLU-pooled features)
      between predicted and original features, averaged over feature dims and masked regions.
    * obj_label / attr_label: cross-entropy against the detector's label on masked regions, each
      multiplied by the detector's confidence and averaged over the masked regions, so unsure
      labels count less.
    * itm: cross-entropy over {mismatched, matched} on examples with an ITM label.
    * qa: cross-entropy over the answer table, only on examples with an answer whose image was not
      swapped (itm_labels != 0: a mismatched pair's answer is not grounded in the image; a question
      without an ITM label keeps its own image).
    """
    required = ["mlm_labels", "masked_regions", "region_mask", "target_feats", "obj_labels", "obj_confs"]
    required += ["itm_labels", "qa_labels"]
    if output.attr_logits is not None:
        required += ["attr_labels", "attr_confs"]
    missing = [key for key in required if key not in batch]
    if missing:
        raise KeyError(f"pre-training batch lacks {missing}")

    # Targets at the positions the heads were computed at ([B, T] / [B, R], or [M] / [K] when the model
    # was given mlm_positions / object_positions); the sums and counts are the same either way.
    text_at = _positions_reader(output.mlm_positions, batch["mlm_labels"] >= 0, "mlm_positions", "masked token")
    mlm_labels = text_at(batch["mlm_labels"])
    mlm = _mean_over(_cross_entropy(output.mlm_logits, mlm_labels, mlm_labels >= 0), mlm_labels >= 0)

    masked_everywhere = batch["masked_regions"].bool() & batch["region_mask"].bool()  # [B, R]
    regions_at = _positions_reader(output.object_positions, masked_everywhere, "object_positions", "masked region")
    masked = regions_at(masked_everywhere)
    feat_error = F.smooth_l1_loss(
        output.obj_feat_pred.float(), regions_at(batch["target_feats"]).float(), reduction="none", beta=1.0
    ).mean(dim=-1)  # [B, R] | [K]
    obj_feat = _mean_over(feat_error, masked)

    obj_label = _detector_label_loss(
        output.obj_logits, regions_at(batch["obj_labels"]), regions_at(batch["obj_confs"]), masked
    )
    attr_label = _detector_label_loss(
        output.attr_logits, regions_at(batch.get("attr_labels")), regions_at(batch.get("attr_confs")), masked
    )

    itm_labels = batch["itm_labels"]
    itm = _mean_over(_cross_entropy(output.itm_logits, itm_labels, itm_labels >= 0), itm_labels >= 0)

    qa = None
    if output.qa_logits is not None:
        qa_labels = batch["qa_labels"]
        answered = (qa_labels >= 0) & (itm_labels != 0)
        qa = _mean_over(_cross_entropy(output.qa_logits, qa_labels, answered), answered)

    zero = output.pooled.new_zeros(())  # a term the model has no head for
    losses = {
        "mlm": mlm,
        "obj_feat": obj_feat,
        "obj_label": zero if obj_label is None else obj_label,
        "attr_label": zero if attr_label is None else attr_label,
        "itm": itm,
        "qa": zero if qa is None else qa,
    }
    losses["total"] = sum(getattr(weights, name) * losses[name] for name in LOSS_NAMES)
    return losses

