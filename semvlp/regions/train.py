"""Training the tiny torchvision detector (+ attribute head) on COCO-format instances.

The embedded world has no pretrained detector to load, so the workflow trains one on its own generated
scenes: `train_detector(instances_json, images_dir, checkpoint_out, cfg)`. The checkpoint rebuilds
itself (`torchvision_backend.load_detector`) and feeds the torchvision extraction backend.

All images are held in memory as uint8 tensors: this trainer is sized for the embedded world
(~1000 images of 96x96 px), not for Visual Genome.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm

from semvlp.data.formats import CocoImage, load_coco_instances
from semvlp.errors import InputError
from semvlp.regions.extract import load_image
from semvlp.regions.selection import DetectedRegions, SelectionConfig
from semvlp.regions.torchvision_backend import DetectorSpec, RegionDetector, build_detector, save_detector

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of one detector training run (all of them change the result)."""

    seed: int = 0
    epochs: int = 4
    max_steps: int | None = None  # stop after this many optimiser steps (smoke runs, tests)
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 30
    grad_clip_norm: float = 10.0
    attribute_loss_weight: float = 1.0
    holdout_fraction: float = 0.1  # images kept out of training for the sanity evaluation
    max_holdout_images: int = 100
    eval_iou: float = 0.5
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    detector: dict[str, Any] = field(default_factory=dict)  # DetectorSpec overrides for "tiny"
    selection: dict[str, Any] = field(default_factory=dict)  # SelectionConfig for the evaluation

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "TrainConfig":
        values = dict(values or {})
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown detector training settings: {sorted(unknown)}")
        return cls(**values)


@dataclass
class TrainingExample:
    """One training image: pixels and targets in the detector's label space."""

    img_id: str
    pixels: torch.Tensor  # (3, H, W) uint8
    boxes: torch.Tensor  # (G, 4) float32 xyxy pixels
    labels: torch.Tensor  # (G,) int64 in 1..K (0 is background)
    attributes: torch.Tensor  # (G, A+1) float32 target distribution; column 0 = no attribute


def train_detector(
    instances_path: str | Path,
    images_dir: str | Path,
    out_path: str | Path,
    cfg: TrainConfig | dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the tiny detector on `instances_path` (COCO instances, optional attribute extension).

    Writes a self-describing checkpoint to `out_path` atomically and returns metrics: the loss history
    and, on held-out images, the share of ground-truth boxes found (IoU >= eval_iou, right class) by a
    kept region, the precision of confident regions, and attribute accuracy.
    """
    cfg = cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_dict(cfg)
    started = time.perf_counter()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    _seed_everything(cfg.seed)

    instances = load_coco_instances(instances_path)
    if not instances.images:
        raise InputError("no images in the instances file: nothing to train on", instances_path)
    if not instances.categories:
        raise InputError("no categories in the instances file", instances_path)
    category_ids = sorted(instances.categories)
    attribute_ids = sorted(instances.attributes)
    spec = DetectorSpec.create(
        "tiny",
        [instances.categories[c] for c in category_ids],
        [instances.attributes[a] for a in attribute_ids],
        **cfg.detector,
    )
    label_of_category = {c: i + 1 for i, c in enumerate(category_ids)}  # detector label 0 = background
    column_of_attribute = {a: i + 1 for i, a in enumerate(attribute_ids)}  # column 0 = no attribute
    examples = [
        _load_example(image, Path(images_dir), label_of_category, column_of_attribute, len(attribute_ids))
        for image in tqdm(instances.images, desc="load images", unit="img", mininterval=5.0)
    ]

    order = np.random.default_rng(cfg.seed).permutation(len(examples))
    num_holdout = min(cfg.max_holdout_images, int(round(cfg.holdout_fraction * len(examples))), len(examples) - 1)
    holdout = [examples[i] for i in order[:num_holdout]]
    train_set = [examples[i] for i in order[num_holdout:]]

    detector = build_detector(spec)
    history = _fit(detector, train_set, cfg)
    evaluation = evaluate_detector(detector, holdout, SelectionConfig.from_dict(cfg.selection), cfg.eval_iou)

    metrics = {
        "train_images": len(train_set),
        "holdout_images": len(holdout),
        "steps": len(history["loss"]),
        "loss_history": history["loss"],
        "loss_components_last_epoch": history["components"],
        **evaluation,
    }
    training_record = {
        "config": asdict(cfg),
        "instances": str(instances_path),
        "category_ids": category_ids,  # obj_id i <-> COCO category_ids[i]
        "attribute_ids": attribute_ids,  # attr_id i <-> attribute_ids[i]
        "metrics": metrics,  # without the wall time, so that a rerun writes the same checkpoint
    }
    save_detector(detector, out_path, training=training_record)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    log.info(
        "detector: %d steps, held-out GT recall@%.1f %.3f, attribute accuracy %s",
        metrics["steps"], cfg.eval_iou, metrics["gt_recall"], metrics["attribute_accuracy"],
    )
    return metrics


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load_example(
    image: CocoImage,
    images_dir: Path,
    label_of_category: dict[int, int],
    column_of_attribute: dict[int, int],
    num_attributes: int,
) -> TrainingExample:
    path = images_dir / image.file_name
    pil_image = load_image(path)
    if (pil_image.width, pil_image.height) != (image.width, image.height):
        raise InputError(
            f"image is {pil_image.width}x{pil_image.height} but the instances file says {image.width}x{image.height}", path
        )
    # torchvision refuses degenerate boxes in training; such annotations carry no box to learn.
    objects = [o for o in image.objects if o.box[2] - o.box[0] >= 1 and o.box[3] - o.box[1] >= 1]
    attributes = torch.zeros(len(objects), num_attributes + 1)  # (G, A+1)
    for row, obj in enumerate(objects):
        if obj.attribute_ids:
            # Uniform over the object's attributes: the mean of one cross-entropy per attribute.
            for attribute_id in obj.attribute_ids:
                attributes[row, column_of_attribute[attribute_id]] = 1.0 / len(obj.attribute_ids)
        else:
            attributes[row, 0] = 1.0
    return TrainingExample(
        img_id=image.img_id,
        pixels=pil_to_tensor(pil_image),
        boxes=torch.tensor([o.box for o in objects], dtype=torch.float32).reshape(-1, 4),
        labels=torch.tensor([label_of_category[o.category_id] for o in objects], dtype=torch.int64),
        attributes=attributes,
    )


def _fit(detector: RegionDetector, train_set: list[TrainingExample], cfg: TrainConfig) -> dict[str, Any]:
    """AdamW with linear warm-up and cosine decay; returns per-step total losses."""
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer = torch.optim.AdamW(detector.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    components: dict[str, float] = {}
    detector.train()
    progress = tqdm(total=total_steps, desc="train detector", unit="step", mininterval=5.0)
    step = 0
    while step < total_steps:
        epoch_sums: dict[str, float] = {}
        epoch_batches = 0
        for batch_rows in torch.randperm(len(train_set), generator=generator).split(cfg.batch_size):
            if step >= total_steps:
                break
            batch = [train_set[i] for i in batch_rows.tolist()]
            images = [example.pixels.float().div(255.0) for example in batch]
            targets = [{"boxes": e.boxes, "labels": e.labels, "attributes": e.attributes} for e in batch]
            loss_terms = detector.training_losses(images, targets)
            weights = {"loss_attribute": cfg.attribute_loss_weight}
            loss = sum(weights.get(name, 1.0) * value for name, value in loss_terms.items())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(detector.parameters(), cfg.grad_clip_norm)
            optimizer.step()
            scheduler.step()
            losses.append(round(loss.item(), 5))
            for name, value in loss_terms.items():
                epoch_sums[name] = epoch_sums.get(name, 0.0) + value.item()
            epoch_batches += 1
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        components = {name: round(total / epoch_batches, 5) for name, total in epoch_sums.items()}
    progress.close()
    detector.eval()
    return {"loss": losses, "components": components}


def match_ground_truth(
    regions: DetectedRegions, gt_boxes: torch.Tensor, gt_labels: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """For each GT box the best-overlapping kept region of the same class at IoU >= threshold, or -1.

    gt_boxes: (G, 4) xyxy pixels; gt_labels: (G,) 0-based class ids (the regions' obj_ids space).
    """
    if len(gt_boxes) == 0 or len(regions.boxes) == 0:
        return torch.full((len(gt_boxes),), -1, dtype=torch.int64)
    iou = box_iou(gt_boxes.float(), regions.boxes.float().cpu())  # (G, n)
    iou[gt_labels[:, None] != regions.obj_ids.cpu()[None, :]] = 0.0
    best_iou, best = iou.max(dim=1)  # (G,)
    return torch.where(best_iou >= iou_threshold, best, torch.full_like(best, -1))


def evaluate_detector(
    detector: RegionDetector, examples: list[TrainingExample], selection: SelectionConfig, iou_threshold: float = 0.5
) -> dict[str, Any]:
    """Sanity metrics of the kept regions on held-out images.

    gt_recall: share of GT boxes matched (IoU >= threshold, right class) by some kept region.
    confident_precision: share of kept regions with obj_conf >= 0.5 that match a GT box that way.
    attribute_accuracy: share of matched GT boxes whose region's attribute is one of the GT's.
    """
    detector.eval()
    found = total = confident = confident_correct = attribute_hits = 0
    for example in examples:
        regions = detector.extract_regions(example.pixels.float().div(255.0), selection)
        gt_labels = example.labels - 1  # (G,) 0-based like obj_ids
        matched = match_ground_truth(regions, example.boxes, gt_labels, iou_threshold)  # (G,)
        found += int((matched >= 0).sum())
        total += len(matched)
        for gt_row, region_row in enumerate(matched.tolist()):
            if region_row >= 0 and example.attributes[gt_row, int(regions.attr_ids[region_row]) + 1] > 0:
                attribute_hits += 1
        is_confident = regions.obj_confs.cpu() >= 0.5  # (n,)
        if len(example.boxes) and is_confident.any():
            iou = box_iou(regions.boxes[is_confident].float().cpu(), example.boxes)  # (c, G)
            same_class = regions.obj_ids[is_confident].cpu()[:, None] == gt_labels[None, :]
            confident_correct += int(((iou >= iou_threshold) & same_class).any(dim=1).sum())
        confident += int(is_confident.sum())
    has_attributes = detector.attribute_head is not None
    return {
        "eval_iou": iou_threshold,
        "gt_boxes": total,
        "gt_recall": round(found / total, 4) if total else None,
        "confident_regions": confident,
        "confident_precision": round(confident_correct / confident, 4) if confident else None,
        "attribute_accuracy": round(attribute_hits / found, 4) if found and has_attributes else None,
    }
