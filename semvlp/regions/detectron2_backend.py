"""Region extraction with a Detectron2 Faster R-CNN loaded from a local config file and weights file.

Supported models (a GeneralizedRCNN that the installed detectron2 builds from the config):

* C4 models (``Res5ROIHeads``): the feature is the res5 output mean-pooled over the RoI, 2048-d. This is
  the bottom-up-attention ResNet-101 layout. Its Visual Genome configs need a detectron2 build that
  defines their extra keys (e.g. airsplay/py-bottom-up-attention's fork); there, with
  ``ROI_BOX_HEAD.ATTR: True``, the box predictor also returns attribute logits, which we use.
* FPN models (``StandardROIHeads``, model-zoo ``faster_rcnn_*_FPN_*``): the box head output, 1024-d.

detectron2 is an optional dependency, imported only when this backend is built. It is not on PyPI;
install it by its own instructions.

The pipeline mirrors the torchvision backend: resize -> backbone -> RPN proposals -> RoI features of
every proposal -> per-class boxes and scores -> bottom-up-attention selection -> RoI features of the
selected boxes (exported with them).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.ops import clip_boxes_to_image

from semvlp.errors import InputError
from semvlp.io import file_digest
from semvlp.regions.selection import DetectedRegions, SelectionConfig, select_regions

INSTALL_HINT = (
    "the detectron2 backend needs the 'detectron2' package, which is not installed (it is not on PyPI); "
    "install it following https://detectron2.readthedocs.io/en/latest/tutorials/install.html "
    "(for bottom-up-attention Visual Genome models, the matching fork's own install instructions), "
    "or use the torchvision backend"
)


class BackendUnavailableError(InputError):
    """The configured backend cannot run because its package is not installed."""


def _import_detectron2() -> dict[str, Any]:
    """The detectron2 names this backend uses; BackendUnavailableError when it is not installed."""
    try:
        import detectron2
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import get_cfg
        from detectron2.data.transforms import ResizeShortestEdge
        from detectron2.modeling import build_model
        from detectron2.structures import Boxes
    except ImportError as err:
        raise BackendUnavailableError(f"{INSTALL_HINT} ({err})") from None
    return dict(
        version=getattr(detectron2, "__version__", "unknown"),
        DetectionCheckpointer=DetectionCheckpointer,
        get_cfg=get_cfg,
        ResizeShortestEdge=ResizeShortestEdge,
        build_model=build_model,
        Boxes=Boxes,
    )


class Detectron2Backend:
    """A detectron2 GeneralizedRCNN driven module by module, as `RegionExtractor` uses it."""

    def __init__(
        self,
        config_path: Path,
        weights_path: Path,
        selection: SelectionConfig,
        *,
        min_size: int | None = None,
        max_size: int | None = None,
        rpn_post_nms_top_n_test: int | None = 300,
        attributes: bool = True,
        device: str = "cpu",
    ):
        for path, what in ((config_path, "detectron2 config file"), (weights_path, "detectron2 weights file")):
            if not Path(path).is_file():
                raise InputError(f"{what} not found", path)
        if config_path.suffix == ".py":
            raise InputError("LazyConfig (.py) files are not supported; give a yacs .yaml config", config_path)
        d2 = _import_detectron2()
        self._d2 = d2
        self.config_path = config_path
        self.weights_path = weights_path
        self.selection = selection
        self.attributes = attributes

        cfg = d2["get_cfg"]()
        try:
            cfg.merge_from_file(str(config_path))
        except KeyError as err:
            # Unknown keys mean the config was written for another detectron2 build (e.g. a
            # bottom-up-attention fork); ignoring them would silently build a different network.
            raise InputError(f"this detectron2 build does not know a config key ({err}); "
                             "install the detectron2 build the config was written for", config_path) from None
        except Exception as err:  # yaml and yacs raise many types for a malformed file
            raise InputError(f"cannot read detectron2 config ({type(err).__name__}: {err})", config_path) from None
        cfg.MODEL.WEIGHTS = str(weights_path)
        cfg.MODEL.DEVICE = device
        if min_size is not None:
            cfg.INPUT.MIN_SIZE_TEST = min_size
        if max_size is not None:
            cfg.INPUT.MAX_SIZE_TEST = max_size
        if rpn_post_nms_top_n_test is not None:
            cfg.MODEL.RPN.POST_NMS_TOPK_TEST = rpn_post_nms_top_n_test
        if cfg.INPUT.FORMAT not in ("BGR", "RGB"):
            raise InputError(f"INPUT.FORMAT {cfg.INPUT.FORMAT!r} is not supported (BGR or RGB)", config_path)
        cfg.freeze()
        self.cfg = cfg

        model = d2["build_model"](cfg)
        roi_heads = model.roi_heads
        if isinstance(roi_heads.box_predictor, torch.nn.ModuleList):
            raise InputError("cascade ROI heads are not supported (several box predictors)", config_path)
        if not hasattr(roi_heads, "_shared_roi_transform") and not hasattr(roi_heads, "box_head"):
            raise InputError(f"unsupported ROI heads {type(roi_heads).__name__} (need C4 or FPN box heads)", config_path)
        self._load_weights(model)
        self.model = model.eval()
        self.device = torch.device(device)
        self.resize = d2["ResizeShortestEdge"]([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)

    def _load_weights(self, model: torch.nn.Module) -> None:
        """Load weights and fail when a parameter was not filled from the file (detectron2 only logs it)."""
        outcome: dict[str, Any] = {}

        class _RecordingCheckpointer(self._d2["DetectionCheckpointer"]):
            def _load_model(self, checkpoint):  # noqa: ANN001 - detectron2's signature
                outcome["incompatible"] = super()._load_model(checkpoint)
                return outcome["incompatible"]

        initial = {name: p.detach().clone() for name, p in model.named_parameters()}
        try:
            _RecordingCheckpointer(model).load(str(self.weights_path))
        except Exception as err:  # pickle / torch / fvcore raise many types for a bad file
            raise InputError(f"cannot load detectron2 weights ({type(err).__name__}: {err})", self.weights_path) from None
        incompatible = outcome.get("incompatible")
        if incompatible is not None:
            missing = [k for k in incompatible.missing_keys if k in initial]
            wrong_shape = [k for k, *_ in getattr(incompatible, "incorrect_shapes", [])]
        else:
            # Older fvcore (e.g. in the bottom-up-attention fork) reports nothing: a parameter that
            # still holds its random initial value was not in the file, or had another shape. Constant
            # initial values (zero biases) cannot tell, so only randomly initialised ones are checked.
            missing = [
                name for name, p in model.named_parameters()
                if initial[name].unique().numel() > 1 and torch.equal(p.detach(), initial[name])
            ]
            wrong_shape = []
        if missing or wrong_shape:
            raise InputError(
                f"weights do not fit the model of {self.config_path.name}: "
                f"{len(missing)} parameter(s) not loaded (first: {missing[:3]}), "
                f"{len(wrong_shape)} with another shape (first: {wrong_shape[:3]})",
                self.weights_path,
            )

    @property
    def feature_dim(self) -> int:
        # The box predictor reads exactly the pooled feature we export.
        return int(self.model.roi_heads.box_predictor.cls_score.in_features)

    @property
    def num_attributes(self) -> int:
        """Attribute classes predicted: the model's attribute head's (0 without one, or with `attributes` off)."""
        attr_score = getattr(self.model.roi_heads.box_predictor, "attr_score", None)
        if attr_score is None or not self.attributes:
            return 0
        return int(attr_score.out_features) - 1  # last = "no attribute"

    def provenance(self) -> dict[str, Any]:
        return {
            "backend": "detectron2",
            "detectron2_version": self._d2["version"],
            "config_file": str(self.config_path),
            "config_sha256": file_digest(self.config_path),
            "weights": str(self.weights_path),
            "weights_sha256": file_digest(self.weights_path),
            "min_size": int(self.cfg.INPUT.MIN_SIZE_TEST),
            "max_size": int(self.cfg.INPUT.MAX_SIZE_TEST),
            "rpn_post_nms_top_n_test": int(self.cfg.MODEL.RPN.POST_NMS_TOPK_TEST),
            "feature_dim": self.feature_dim,
            "num_object_classes": int(self.model.roi_heads.box_predictor.cls_score.out_features) - 1,
            "num_attribute_classes": self.num_attributes,
            "attributes": self.attributes,
            "selection": asdict(self.selection),
        }

    def _pool(self, features: dict[str, torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        """RoI feature of each box of each image ((n_i, 4) in resized-image pixels) -> (sum n_i, feature_dim)."""
        roi_heads = self.model.roi_heads
        box_list = [self._d2["Boxes"](image_boxes) for image_boxes in boxes]
        if hasattr(roi_heads, "_shared_roi_transform"):  # C4: res5 on the pooled RoI, then mean over it
            res5 = roi_heads._shared_roi_transform([features[f] for f in roi_heads.in_features], box_list)
            return res5.mean(dim=[2, 3])
        pooled = roi_heads.box_pooler([features[f] for f in roi_heads.box_in_features], box_list)
        return roi_heads.box_head(pooled)

    def _input_tensor(self, image: Image.Image) -> torch.Tensor:
        """(3, h, w) float pixels in the model's channel order, resized to the test size."""
        rgb = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
        pixels = np.ascontiguousarray(rgb[:, :, ::-1]) if self.cfg.INPUT.FORMAT == "BGR" else rgb
        resized = self.resize.get_transform(pixels).apply_image(pixels)  # (h, w, 3)
        return torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)), dtype=torch.float32)

    def padded_size(self, width: int, height: int) -> tuple[int, int]:
        """(h, w) of the network input of a width x height image: resized to the test size, padded to the
        backbone's size divisibility. Images of one padded size batch exactly as they run alone."""
        short = self.cfg.INPUT.MIN_SIZE_TEST
        h, w = self._d2["ResizeShortestEdge"].get_output_shape(height, width, short, self.cfg.INPUT.MAX_SIZE_TEST)
        divisor = max(1, int(self.model.backbone.size_divisibility))
        return tuple(int(math.ceil(side / divisor) * divisor) for side in (h, w))

    @torch.inference_mode()
    def extract_batch(self, images: list[Image.Image]) -> list[DetectedRegions]:
        """Regions of each image in one forward pass; the model pads the batch to its largest image
        (to a multiple of its SIZE_DIVISIBILITY), proposals, selection and pooling are per image."""
        batch = self.model.preprocess_image([{"image": self._input_tensor(image).to(self.device)} for image in images])
        features = self.model.backbone(batch.tensor)
        proposals, _ = self.model.proposal_generator(batch, features, None)
        proposal_boxes = [p.proposal_boxes.tensor for p in proposals]  # [(P_i, 4)]

        roi_heads = self.model.roi_heads
        predictor = roi_heads.box_predictor
        outputs = predictor(self._pool(features, proposal_boxes))
        class_logits, box_deltas = outputs[0], outputs[-1]  # the fork returns (class, attribute, deltas)
        # Recent detectron2 keeps the box transform on the predictor, older builds on the ROI heads.
        box_transform = getattr(predictor, "box2box_transform", None) or roi_heads.box2box_transform
        boxes = box_transform.apply_deltas(box_deltas, torch.cat(proposal_boxes))  # (sum P_i, K*4) or (sum P_i, 4)
        if getattr(predictor, "use_sigmoid_ce", False):
            probabilities = class_logits.sigmoid()
        else:
            probabilities = class_logits.softmax(dim=-1)
        counts = [len(b) for b in proposal_boxes]
        kept = []
        for image_boxes, image_probabilities, size in zip(boxes.split(counts), probabilities.split(counts), batch.image_sizes):
            resized_hw = (int(size[0]), int(size[1]))
            image_boxes = clip_boxes_to_image(image_boxes.view(len(image_boxes), -1, 4), resized_hw)  # (P, K or 1, 4)
            # detectron2 puts the background class last
            candidates = image_boxes.squeeze(1) if image_boxes.shape[1] == 1 else image_boxes
            kept.append((select_regions(candidates, image_probabilities[:, :-1], self.selection), resized_hw))

        pooled_all = self._pool(features, [k.boxes for k, _ in kept])  # (sum n_i, D)
        regions = []
        for (k, resized_hw), pooled, image in zip(kept, pooled_all.split([len(k.indices) for k, _ in kept]), images):
            n = len(k.indices)
            attr_ids = torch.zeros(n, dtype=torch.int64, device=pooled.device)
            attr_confs = torch.zeros(n, device=pooled.device)
            if self.num_attributes and n:
                _, attr_logits, _ = predictor(pooled)
                # As the py-bottom-up-attention demos: drop the last ("no attribute") logit, then softmax.
                attr_confs, attr_ids = attr_logits[:, :-1].softmax(dim=-1).max(dim=-1)
            scale = torch.tensor([image.width / resized_hw[1], image.height / resized_hw[0]] * 2, device=k.boxes.device)
            regions.append(DetectedRegions(
                boxes=k.boxes * scale,
                features=pooled,
                obj_ids=k.obj_ids,
                obj_confs=k.obj_confs,
                attr_ids=attr_ids,
                attr_confs=attr_confs,
            ))
        return regions


# The extractor settings this backend reads (semvlp.regions.extract checks configs against them);
# known without detectron2, which is imported only when a backend is built.
SETTINGS = frozenset(
    {"backend", "config_file", "weights", "attributes", "min_size", "max_size", "rpn_post_nms_top_n_test", "selection", "device"}
)


def build_detectron2_backend(cfg: dict[str, Any]) -> Detectron2Backend:
    """Backend from an extractor config dict.

    Keys: ``config_file`` and ``weights`` (local paths, required); ``attributes`` (predict attributes
    with the model's attribute head when it has one; default true); ``min_size``, ``max_size``,
    ``rpn_post_nms_top_n_test`` (test-time overrides; proposals default to 300 as bottom-up-attention);
    ``selection`` (SelectionConfig fields); ``device`` (default "cpu").
    """
    unknown = set(cfg) - SETTINGS
    if unknown:
        raise ValueError(f"unknown detectron2 extractor settings: {sorted(unknown)}")
    missing = [k for k in ("config_file", "weights") if k not in cfg]
    if missing:
        raise ValueError(f"detectron2 extractor config needs {missing} (local files)")
    return Detectron2Backend(
        Path(cfg["config_file"]),
        Path(cfg["weights"]),
        SelectionConfig.from_dict(cfg.get("selection")),
        min_size=cfg.get("min_size"),
        max_size=cfg.get("max_size"),
        rpn_post_nms_top_n_test=cfg.get("rpn_post_nms_top_n_test", 300),
        attributes=cfg.get("attributes", True),
        device=cfg.get("device", "cpu"),
    )
