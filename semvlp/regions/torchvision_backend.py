"""Region extraction with a torchvision Faster R-CNN (+ a bottom-up-attention style attribute head).

Two backbones:

* ``"tiny"``: a small CNN trained from scratch on the embedded world (96x96 scenes), fast on a CPU;
* ``"resnet50_fpn"``: torchvision's ``fasterrcnn_resnet50_fpn`` architecture, with weights read from a
  local file only (our checkpoint, or a plain torchvision FasterRCNN state dict).

Extraction does not use ``FasterRCNN.forward``'s post-processing (it drops the box features). It runs
the modules itself: transform -> backbone -> RPN proposals -> box head on every proposal -> per-class
boxes and scores -> bottom-up-attention selection -> box head again on the *selected* boxes, so every
exported feature is pooled from exactly the box that is exported with it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import fastrcnn_loss
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import MultiScaleRoIAlign, clip_boxes_to_image
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.transforms.functional import pil_to_tensor

from semvlp.errors import InputError
from semvlp.io import atomic_path, file_digest
from semvlp.regions.selection import DetectedRegions, SelectionConfig, select_regions

CHECKPOINT_FORMAT = "semvlp-detector"
BACKBONES = ("tiny", "resnet50_fpn")

# Per-backbone defaults; a DetectorSpec always stores concrete values so a checkpoint rebuilds exactly.
_BACKBONE_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        min_size=96,
        max_size=160,
        representation_size=256,
        rpn_pre_nms_top_n_test=600,
        rpn_post_nms_top_n_test=100,
    ),
    # Bottom-up-attention scores 300 RPN proposals per image at 600 px (short side), 1000 px at most.
    "resnet50_fpn": dict(
        min_size=600,
        max_size=1000,
        representation_size=1024,
        rpn_pre_nms_top_n_test=1000,
        rpn_post_nms_top_n_test=300,
        rpn_pre_nms_top_n_train=2000,
        rpn_post_nms_top_n_train=2000,
        box_batch_size_per_image=512,
    ),
}


@dataclass
class DetectorSpec:
    """Everything needed to rebuild a detector's architecture (saved in every checkpoint)."""

    backbone: str
    categories: list[str]  # foreground classes: obj_id i names categories[i]
    attributes: list[str] = field(default_factory=list)  # attr_id i names attributes[i]; empty: no head
    min_size: int = 96  # short image side after resizing
    max_size: int = 160  # long side cap after resizing
    representation_size: int = 256  # box head output = exported feature size
    tiny_channels: int = 64  # "tiny" only: backbone width
    anchor_sizes: list[int] = field(default_factory=lambda: [8, 16, 32, 64])  # "tiny" only, pixels
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # "tiny" only
    rpn_pre_nms_top_n_test: int = 600
    rpn_post_nms_top_n_test: int = 100  # proposals scored per image at extraction
    # Training budgets (torchvision's defaults are sized for COCO photos; small scenes need far fewer).
    rpn_pre_nms_top_n_train: int = 300
    rpn_post_nms_top_n_train: int = 150
    box_batch_size_per_image: int = 64  # sampled proposals per image for the box head losses

    @classmethod
    def create(cls, backbone: str, categories: list[str], attributes: list[str] = (), **overrides: Any) -> "DetectorSpec":
        """A spec with the backbone's defaults, then `overrides` on top."""
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {BACKBONES}")
        return cls(backbone, list(categories), list(attributes), **{**_BACKBONE_DEFAULTS[backbone], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DetectorSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown detector settings: {sorted(unknown)}")
        return cls(**values)


class TinyBackbone(nn.Sequential):
    """Five 3x3 conv layers, stride 4, for small rendered scenes (objects of roughly 8-60 px)."""

    def __init__(self, channels: int):
        half = channels // 2

        def conv(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]

        # The dilated last layer widens the receptive field to ~35 px without losing resolution.
        super().__init__(
            *conv(3, half, stride=2),
            *conv(half, half),
            *conv(half, channels, stride=2),
            *conv(channels, channels),
            *conv(channels, channels, dilation=2),
        )
        self.out_channels = channels


class RegionDetector(nn.Module):
    """A torchvision FasterRCNN plus an optional attribute classifier on the box head's output.

    Attribute classes are ``0 = no attribute`` followed by ``spec.attributes`` (the bottom-up-attention
    convention); the exported attr_id is 0-based over ``spec.attributes``.
    """

    def __init__(self, spec: DetectorSpec):
        super().__init__()
        self.spec = spec
        self.detector = _build_faster_rcnn(spec)
        self.attribute_head = (
            nn.Linear(spec.representation_size, len(spec.attributes) + 1) if spec.attributes else None
        )

    @property
    def feature_dim(self) -> int:
        return self.spec.representation_size

    def feature_maps(self, batch: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """Backbone feature maps of a normalised, padded batch (N, 3, H, W), keyed as RoI pooling expects."""
        features = self.detector.backbone(batch)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        return features

    def box_features(
        self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor], image_sizes: list[tuple[int, int]]
    ) -> torch.Tensor:
        """Box-head representation of each box: (sum of boxes, representation_size)."""
        roi_heads = self.detector.roi_heads
        return roi_heads.box_head(roi_heads.box_roi_pool(features, boxes, image_sizes))

    def training_losses(
        self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Faster R-CNN losses plus the attribute loss on foreground sampled proposals.

        images: list of (3, H, W) float in [0, 1]. targets: per image "boxes" (G, 4) xyxy pixels,
        "labels" (G,) int64 in 1..K, and when the model has an attribute head "attributes" (G, A+1):
        a distribution over attribute classes (uniform over the object's attributes, or class 0).
        """
        image_list, targets = self.detector.transform(images, targets)
        features = self.feature_maps(image_list.tensors)
        proposals, rpn_losses = self.detector.rpn(image_list, features, targets)
        roi_heads = self.detector.roi_heads
        proposals, matched_idxs, labels, regression_targets = roi_heads.select_training_samples(proposals, targets)
        representation = self.box_features(features, proposals, image_list.image_sizes)  # (S, D)
        class_logits, box_regression = roi_heads.box_predictor(representation)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        losses = {**rpn_losses, "loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        if self.attribute_head is not None:
            foreground = torch.cat(labels) > 0  # (S,)
            attribute_targets = torch.cat([t["attributes"][m] for t, m in zip(targets, matched_idxs)])  # (S, A+1)
            if foreground.any():
                log_probs = F.log_softmax(self.attribute_head(representation[foreground]), dim=-1)
                losses["loss_attribute"] = -(attribute_targets[foreground] * log_probs).sum(dim=-1).mean()
            else:
                losses["loss_attribute"] = representation.sum() * 0.0  # a zero that still has a graph
        return losses

    def extract_regions(self, image: torch.Tensor, selection: SelectionConfig) -> DetectedRegions:
        """Regions of one image. image: (3, H, W) float in [0, 1] on the model's device."""
        return self.extract_batch([image], selection)[0]

    @torch.inference_mode()
    def extract_batch(self, images: list[torch.Tensor], selection: SelectionConfig) -> list[DetectedRegions]:
        """Regions of each image, in one forward pass. images: (3, H, W) floats in [0, 1] on the model's device.

        The batch is padded (with zeros after normalisation, as a lone image is up to a multiple of 32) to
        its largest image; proposals, selection and pooling are per image (DEVELOPERS.md, "Batched
        extraction", for how far batched features differ from unbatched ones).
        """
        if self.training:
            raise RuntimeError("call .eval() before extracting regions")
        original_sizes = [[int(image.shape[-2]), int(image.shape[-1])] for image in images]
        image_list, _ = self.detector.transform(images)
        features = self.feature_maps(image_list.tensors)
        proposals, _ = self.detector.rpn(image_list, features)  # [(P_i, 4)]

        representation = self.box_features(features, proposals, image_list.image_sizes)  # (sum P_i, D)
        class_logits, box_deltas = self.detector.roi_heads.box_predictor(representation)  # (., K+1), (., 4(K+1))
        all_boxes = self.detector.roi_heads.box_coder.decode(box_deltas, proposals)  # (sum P_i, K+1, 4)
        all_probabilities = F.softmax(class_logits, dim=-1)
        counts = [len(p) for p in proposals]
        kept = []
        for boxes, probabilities, size in zip(all_boxes.split(counts), all_probabilities.split(counts), image_list.image_sizes):
            # column 0 is torchvision's background class
            kept.append(select_regions(clip_boxes_to_image(boxes, size)[:, 1:], probabilities[:, 1:], selection))

        pooled_all = self.box_features(features, [k.boxes for k in kept], image_list.image_sizes)  # (sum n_i, D)
        regions = []
        for k, pooled, resized, original in zip(kept, pooled_all.split([len(k.indices) for k in kept]), image_list.image_sizes, original_sizes):
            if self.attribute_head is not None and len(k.indices):
                attribute_probs = F.softmax(self.attribute_head(pooled), dim=-1)[:, 1:]  # (n, A) without "none"
                attr_confs, attr_ids = attribute_probs.max(dim=-1)
            else:
                attr_confs = torch.zeros(len(k.indices), device=pooled.device)
                attr_ids = torch.zeros(len(k.indices), dtype=torch.int64, device=pooled.device)
            regions.append(DetectedRegions(
                boxes=resize_boxes(k.boxes, list(resized), original),
                features=pooled,
                obj_ids=k.obj_ids,
                obj_confs=k.obj_confs,
                attr_ids=attr_ids,
                attr_confs=attr_confs,
            ))
        return regions


def _build_faster_rcnn(spec: DetectorSpec) -> FasterRCNN:
    num_classes = len(spec.categories) + 1  # + background
    common = dict(
        min_size=spec.min_size,
        max_size=spec.max_size,
        rpn_pre_nms_top_n_test=spec.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=spec.rpn_post_nms_top_n_test,
        rpn_pre_nms_top_n_train=spec.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=spec.rpn_post_nms_top_n_train,
        box_batch_size_per_image=spec.box_batch_size_per_image,
    )
    if spec.backbone == "tiny":
        backbone = TinyBackbone(spec.tiny_channels)
        pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
        return FasterRCNN(
            backbone,
            rpn_anchor_generator=AnchorGenerator((tuple(spec.anchor_sizes),), (tuple(spec.aspect_ratios),)),
            box_roi_pool=pool,
            box_head=TwoMLPHead(backbone.out_channels * 7 * 7, spec.representation_size),
            box_predictor=FastRCNNPredictor(spec.representation_size, num_classes),
            rpn_batch_size_per_image=128,  # anchors sampled per image for the RPN losses
            **common,
        )
    if spec.backbone == "resnet50_fpn":
        # The layout of torchvision's fasterrcnn_resnet50_fpn (frozen batch norm, as when it is loaded
        # with weights), built without any download; module names match its published state dicts.
        backbone = resnet_fpn_backbone(
            backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=3
        )
        return FasterRCNN(
            backbone,
            box_head=TwoMLPHead(backbone.out_channels * 7 * 7, spec.representation_size),
            box_predictor=FastRCNNPredictor(spec.representation_size, num_classes),
            **common,
        )
    raise ValueError(f"unknown backbone {spec.backbone!r}; choose one of {BACKBONES}")


def build_detector(spec: DetectorSpec) -> RegionDetector:
    """A detector with freshly initialised weights."""
    return RegionDetector(spec)


def save_detector(detector: RegionDetector, path: str | Path, training: dict[str, Any] | None = None) -> None:
    """Write a checkpoint that rebuilds itself: spec + state dict (+ training record), atomically."""
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "version": 1,
        "spec": detector.spec.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in detector.state_dict().items()},
        "training": training or {},
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


def _read_weights_file(path: Path) -> Any:
    """The object a weights file holds (tensors and plain containers only: weights_only)."""
    if not path.is_file():
        raise InputError("detector weights file not found", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a bad file
        raise InputError(f"not a readable PyTorch weights file ({type(err).__name__}: {err})", path) from None


def read_training_record(path: str | Path) -> dict[str, Any]:
    """What `train_detector` recorded in a checkpoint it wrote (config, loss history, held-out metrics)."""
    path = Path(path)
    payload = _read_weights_file(path)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT or not payload.get("training"):
        raise InputError("not a detector checkpoint written by train_detector (no training record)", path)
    return payload["training"]


def load_detector(
    path: str | Path,
    *,
    backbone: str = "resnet50_fpn",
    categories: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> RegionDetector:
    """Load a detector from a local file: our checkpoint, or a plain torchvision FasterRCNN state dict.

    For a plain state dict the architecture comes from `backbone` and the class count from the file;
    `categories` names the foreground classes (generic names otherwise). `overrides` changes test-time
    settings of the spec (min_size, max_size, rpn_*_test).
    """
    path = Path(path)
    payload = _read_weights_file(path)
    if not isinstance(payload, dict):
        raise InputError("weights file does not hold a state dict or a semvlp detector checkpoint", path)

    if payload.get("format") == CHECKPOINT_FORMAT:
        spec = DetectorSpec.from_dict(payload["spec"])
        state_dict, target = payload["state_dict"], "detector"
    else:
        state_dict, target = payload, "faster_rcnn"
        try:
            num_classes = state_dict["roi_heads.box_predictor.cls_score.weight"].shape[0] - 1
            representation_size = state_dict["roi_heads.box_head.fc7.weight"].shape[0]
        except (KeyError, AttributeError):
            raise InputError(
                "not a torchvision FasterRCNN state dict (no roi_heads.box_predictor / box_head keys)", path
            ) from None
        names = list(categories) if categories else [f"class_{i + 1}" for i in range(num_classes)]
        if len(names) != num_classes:
            raise InputError(
                f"weights have {num_classes} foreground classes but {len(names)} category names were given", path
            )
        spec = DetectorSpec.create(backbone, names, representation_size=representation_size)
    if overrides:
        spec = replace(spec, **overrides)

    detector = RegionDetector(spec)
    module = detector if target == "detector" else detector.detector
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise InputError(f"weights do not fit the {spec.backbone} detector: {str(err).splitlines()[0]}", path) from None
    return detector.eval()


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) float32 in [0, 1] (any mode converted to RGB)."""
    return pil_to_tensor(image.convert("RGB")).float().div_(255.0)


class TorchvisionBackend:
    """The torchvision backend as `semvlp.regions.extract.RegionExtractor` drives it."""

    def __init__(self, detector: RegionDetector, selection: SelectionConfig, weights_path: Path, device: str = "cpu"):
        self.detector = detector.eval().to(device)
        self.selection = selection
        self.weights_path = weights_path
        self.device = torch.device(device)

    @property
    def feature_dim(self) -> int:
        return self.detector.feature_dim

    def provenance(self) -> dict[str, Any]:
        spec = self.detector.spec
        return {
            "backend": "torchvision",
            "weights": str(self.weights_path),
            "weights_sha256": file_digest(self.weights_path),
            "detector": spec.to_dict(),
            "feature_dim": self.feature_dim,
            "num_object_classes": len(spec.categories),
            "num_attribute_classes": len(spec.attributes),
            "selection": asdict(self.selection),
        }

    def padded_size(self, width: int, height: int) -> tuple[int, int]:
        """(h, w) of the network input of a width x height image: resized as the detector's transform
        resizes (its own float32 arithmetic), then padded to its size divisor. Images of one padded
        size batch exactly as they run alone (DEVELOPERS.md, "Batched extraction")."""
        transform = self.detector.detector.transform
        shape = torch.tensor([height, width], dtype=torch.float32)
        scale = torch.min(float(transform.min_size[-1]) / shape.min(), float(transform.max_size) / shape.max()).item()
        divisor = transform.size_divisible
        return tuple(int(math.ceil(math.floor(side * scale) / divisor) * divisor) for side in (height, width))

    def extract_batch(self, images: list[Image.Image]) -> list[DetectedRegions]:
        return self.detector.extract_batch([image_to_tensor(image).to(self.device) for image in images], self.selection)


# The extractor settings this backend reads (semvlp.regions.extract checks configs against them).
SETTINGS = frozenset(
    {"backend", "weights", "backbone", "categories", "min_size", "max_size", "rpn_post_nms_top_n_test", "selection", "device"}
)


def build_torchvision_backend(cfg: dict[str, Any]) -> TorchvisionBackend:
    """Backend from an extractor config dict.

    Keys: ``weights`` (path, required); ``backbone`` and ``categories`` (only for plain torchvision
    state dicts); ``min_size``, ``max_size``, ``rpn_post_nms_top_n_test`` (test-time overrides);
    ``selection`` (SelectionConfig fields); ``device`` (default "cpu").
    """
    unknown = set(cfg) - SETTINGS
    if unknown:
        raise ValueError(f"unknown torchvision extractor settings: {sorted(unknown)}")
    if "weights" not in cfg:
        raise ValueError("torchvision extractor config needs 'weights' (a local file)")
    overrides = {k: cfg[k] for k in ("min_size", "max_size", "rpn_post_nms_top_n_test") if k in cfg}
    weights_path = Path(cfg["weights"])
    detector = load_detector(
        weights_path, backbone=cfg.get("backbone", "resnet50_fpn"), categories=cfg.get("categories"), overrides=overrides
    )
    selection = SelectionConfig.from_dict(cfg.get("selection"))
    return TorchvisionBackend(detector, selection, weights_path, cfg.get("device", "cpu"))

