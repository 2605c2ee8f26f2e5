"""The SemVLP network: one shared Transformer stack run in single-stream or two-stream mode.

Shapes: B batch, T text tokens, R regions, H hidden size, D region feature size, G box geometry size,
V vocabulary, C object labels, A attribute labels, N answers.

* Text embeddings follow BERT's layout (word + position + token type, LayerNorm, dropout) so any
  BERT-family checkpoint loads onto them (`load_bert_checkpoint`). A model trained from scratch is
  better off without the token-type vector (`type_vocab_size=0`): added to every word and to no
  region, that constant lets attention tell the modalities apart so easily that text learns to ignore
  regions, and pre-training on the embedded default never grounded captions with it.
* Region embeddings follow LXMERT: LayerNorm(Linear(feature)) and LayerNorm(Linear(geometry)),
  averaged. Regions get no position and no token-type embedding: their place comes from the box
  geometry, and the LayerNorm biases of the two projections are a learned constant offset that
  already tells regions apart from words. This keeps BERT's token types 0/1 meaning "sentence A/B".
* Every layer is BERT's post-LN layer (self-attention sub-layer, feed-forward sub-layer); the top
  `cross_layers` layers also hold a cross-attention sub-layer (the pluggable cross-modal module),
  placed between the two and used only in two-stream mode:
  - single: [CLS] text [SEP] and the regions form one sequence with full self-attention;
    cross-attention sub-layers are skipped.
  - two: text and regions run through the same layers separately (self-attention within the
    modality, same weights); in the top k layers text then attends to regions and regions attend
    to text, both computed from the post-self-attention states (LXMERT's simultaneous update).
    An attention sub-layer with nothing to attend to (an example without regions) leaves its input
    unchanged, so text alone passes through either mode exactly as through the BERT it came from.
    By default both directions share one cross-attention module per layer, as LXMERT does
    (`share_cross_attention=False` gives each direction its own).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semvlp.errors import InputError
from semvlp.io import atomic_path, read_json, write_json

Mode = Literal["single", "two"]
MODES: tuple[str, ...] = ("single", "two")
BOX_DIMS: tuple[int, ...] = (4, 7)
INIT_SCHEMES: tuple[str, ...] = ("bert", "pytorch")

# BERT config names of the activations we support, mapped to a module factory.
ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),  # BERT's exact (erf) GELU
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": lambda: nn.ReLU(),
}


@dataclass
class SemVLPConfig:
    """Sizes and choices of the SemVLP network. `to_dict`/`from_dict` round-trip through JSON."""

    vocab_size: int
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    max_position_embeddings: int = 64
    type_vocab_size: int = 2  # 0: no token-type embedding (scratch models; see the module docstring)
    dropout: float = 0.1  # hidden and attention-probability dropout
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    initializer_range: float = 0.02  # std of BERT-style normal initialisation
    # "bert": normal(0, initializer_range) weights, as BERT. "pytorch": PyTorch's own defaults (Linear
    # uniform in +-1/sqrt(fan_in), embeddings normal(0, 1)); scratch models escape the plateau where
    # text ignores regions much sooner with it. Loading a checkpoint overwrites either.
    init_scheme: str = "bert"
    region_feature_dim: int = 2048
    box_dim: int = 4  # 4: LXMERT (x1,y1,x2,y2); 7: UNITER (x1,y1,x2,y2,w,h,w*h); see box_geometry
    cross_layers: int = 2  # k: the top k layers carry the cross-attention sub-layer (two-stream only)
    share_cross_attention: bool = True  # one module for text->regions and regions->text per layer
    num_object_labels: int = 1600  # detector object classes (0: no object-label head)
    num_attribute_labels: int = 400  # detector attribute classes (0: no attribute head)
    num_answers: int = 0  # image-QA answer table size (0: no QA head)
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.box_dim not in BOX_DIMS:
            problems.append(f"box_dim must be one of {BOX_DIMS}, got {self.box_dim}")
        if not 0 <= self.cross_layers <= self.num_layers:
            problems.append(f"cross_layers must be in [0, num_layers={self.num_layers}], got {self.cross_layers}")
        if self.type_vocab_size < 0:
            problems.append(f"type_vocab_size must be >= 0, got {self.type_vocab_size}")
        if self.init_scheme not in INIT_SCHEMES:
            problems.append(f"init_scheme must be one of {INIT_SCHEMES}, got {self.init_scheme!r}")
        if self.hidden_act not in ACTIVATIONS:
            problems.append(f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}")
        for name in ("num_object_labels", "num_attribute_labels", "num_answers"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if problems:
            raise ValueError("invalid SemVLPConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str | Path | None = None) -> SemVLPConfig:
        """Build a config from a dict (e.g. read from JSON); `source` names the file in errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown model config key(s) {unknown}", source)
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise InputError(f"bad model config: {err}", source) from None

    @classmethod
    def from_bert(cls, checkpoint_dir: str | Path, **overrides: Any) -> SemVLPConfig:
        """Sizes from a BERT-family checkpoint's `config.json`; `overrides` set any other field."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown SemVLPConfig field(s) {unknown}")
        config_path = Path(checkpoint_dir) / "config.json"
        bert = read_json(config_path)
        if bert.get("position_embedding_type", "absolute") != "absolute":
            raise InputError(
                f"position_embedding_type {bert['position_embedding_type']!r} is not supported (absolute only)",
                config_path,
            )
        names = {  # our field <- BERT config key
            "vocab_size": "vocab_size",
            "hidden_size": "hidden_size",
            "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads",
            "intermediate_size": "intermediate_size",
            "max_position_embeddings": "max_position_embeddings",
            "type_vocab_size": "type_vocab_size",
            "dropout": "hidden_dropout_prob",
            "layer_norm_eps": "layer_norm_eps",
            "hidden_act": "hidden_act",
            "initializer_range": "initializer_range",
            "pad_token_id": "pad_token_id",
        }
        required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]
        missing = [key for key in required if key not in bert]
        if missing:
            raise InputError(f"missing BERT config key(s) {missing}", config_path)
        values = {ours: bert[theirs] for ours, theirs in names.items() if theirs in bert}
        values.update(overrides)
        return cls.from_dict(values, source=config_path)


ArrayOrTensor = np.ndarray | torch.Tensor


def box_geometry(
    boxes_xyxy_pixels: ArrayOrTensor, img_w: float | ArrayOrTensor, img_h: float | ArrayOrTensor, dim: int = 4
) -> ArrayOrTensor:
    """Normalised box geometry from pixel boxes, for numpy arrays or torch tensors.

    boxes_xyxy_pixels: [..., 4] (x1, y1, x2, y2) in pixels. img_w, img_h: scalars or arrays
    broadcastable against boxes[..., 0] (e.g. [B, 1] for boxes [B, R, 4]).
    Returns float32 [..., dim] of the input's kind: dim 4 is LXMERT's (x1, y1, x2, y2) / (w, h, w, h);
    dim 7 is UNITER's, adding box width, height and area as fractions of the image. Coordinates are
    clipped to [0, 1] because detectors may place a box edge a little outside the image.
    """
    if dim not in BOX_DIMS:
        raise ValueError(f"box geometry dim must be one of {BOX_DIMS}, got {dim}")
    if isinstance(boxes_xyxy_pixels, torch.Tensor):
        boxes = boxes_xyxy_pixels.float()
        img_w = torch.as_tensor(img_w, dtype=torch.float32, device=boxes.device)
        img_h = torch.as_tensor(img_h, dtype=torch.float32, device=boxes.device)
        stack = lambda cols: torch.stack(cols, dim=-1)  # noqa: E731
    else:
        boxes = np.asarray(boxes_xyxy_pixels, dtype=np.float32)
        img_w = np.asarray(img_w, dtype=np.float32)
        img_h = np.asarray(img_h, dtype=np.float32)
        stack = lambda cols: np.stack(cols, axis=-1)  # noqa: E731
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [..., 4], got {tuple(boxes.shape)}")
    if not (bool((img_w > 0).all()) and bool((img_h > 0).all())):
        raise ValueError("image width and height must be positive")
    x1 = (boxes[..., 0] / img_w).clip(0, 1)
    y1 = (boxes[..., 1] / img_h).clip(0, 1)
    x2 = (boxes[..., 2] / img_w).clip(0, 1)
    y2 = (boxes[..., 3] / img_h).clip(0, 1)
    columns = [x1, y1, x2, y2]
    if dim == 7:
        width, height = x2 - x1, y2 - y1
        columns += [width, height, width * height]
    return stack(columns)


# --------------------------------------------------------------------------------------- building blocks


class TextEmbeddings(nn.Module):
    """BERT's input embeddings: word + position (+ token type when type_vocab_size > 0), LayerNorm, dropout."""

    def __init__(self, config: SemVLPConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, config.hidden_size) if config.type_vocab_size else None
        )
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        # input_ids, token_type_ids: [B, T] -> [B, T, H]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # [T]
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        elif token_type_ids is not None:
            raise ValueError("token_type_ids given to a model without token types (type_vocab_size=0)")
        return self.dropout(self.layer_norm(embeddings))


class RegionEmbeddings(nn.Module):
    """LXMERT's region embeddings: mean of LayerNorm(Linear(feature)) and LayerNorm(Linear(geometry))."""

    def __init__(self, config: SemVLPConfig):
        super().__init__()
        self.feature_proj = nn.Linear(config.region_feature_dim, config.hidden_size)
        self.feature_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.geometry_proj = nn.Linear(config.box_dim, config.hidden_size)
        self.geometry_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, region_feats: torch.Tensor, region_geom: torch.Tensor) -> torch.Tensor:
        # region_feats: [B, R, D], region_geom: [B, R, G] -> [B, R, H]. Features may arrive in the store's
        # float16 (half the bytes through the input pipeline and onto the device); widening is exact.
        features = self.feature_norm(self.feature_proj(region_feats.to(self.feature_proj.weight.dtype)))
        geometry = self.geometry_norm(self.geometry_proj(region_geom))
        return self.dropout((features + geometry) / 2)


class AttentionBlock(nn.Module):
    """Multi-head attention, output projection, residual and post-LayerNorm (BERT's attention sub-layer).

    The same block does self-attention (queries and keys from one sequence) and cross-attention.
    """

    def __init__(self, config: SemVLPConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.output = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout_p = config.dropout
        self.dropout = nn.Dropout(config.dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # [B, L, H] -> [B, heads, L, H / heads]
        batch, length, hidden = x.shape
        return x.view(batch, length, self.num_heads, hidden // self.num_heads).transpose(1, 2)

    def forward(self, queries: torch.Tensor, keys_values: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        # queries: [B, Tq, H], keys_values: [B, Tk, H], key_mask: [B, Tk] bool (True = attend) -> [B, Tq, H]
        batch, query_len, hidden = queries.shape
        if keys_values.shape[1] == 0:
            return queries  # nothing to attend to (e.g. no regions): the sub-layer leaves the state as is
        has_key = key_mask.any(dim=1)  # [B]
        # A row with no key to attend to would give NaN: let it attend anywhere, then keep its input.
        attend = (key_mask | ~has_key[:, None])[:, None, None, :]  # [B, 1, 1, Tk]
        context = F.scaled_dot_product_attention(
            self._heads(self.query(queries)),
            self._heads(self.key(keys_values)),
            self._heads(self.value(keys_values)),
            attn_mask=attend,
            dropout_p=self.dropout_p if self.training else 0.0,
        )  # [B, heads, Tq, H / heads]
        context = context.transpose(1, 2).reshape(batch, query_len, hidden)  # [B, Tq, H]
        updated = self.layer_norm(queries + self.dropout(self.output(context)))
        return torch.where(has_key[:, None, None], updated, queries)


class FeedForward(nn.Module):
    """BERT's feed-forward sub-layer: Linear, activation, Linear, dropout, residual, post-LayerNorm."""

    def __init__(self, config: SemVLPConfig):
        super().__init__()
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACTIVATIONS[config.hidden_act]()
        self.output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, L, H] -> [B, L, H]
        return self.layer_norm(x + self.dropout(self.output(self.activation(self.intermediate(x)))))


class SemVLPLayer(nn.Module):
    """One shared layer: self-attention, optional cross-attention (two-stream only), feed-forward."""

    def __init__(self, config: SemVLPConfig, with_cross_attention: bool):
        super().__init__()
        self.self_attention = AttentionBlock(config)
        # cross_attention: text queries attend to regions (and, when shared, regions to text).
        self.cross_attention = AttentionBlock(config) if with_cross_attention else None
        self.region_cross_attention = (
            AttentionBlock(config) if with_cross_attention and not config.share_cross_attention else None
        )
        self.feed_forward = FeedForward(config)

    def forward_single(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # hidden: [B, T + R, H] (text then regions), mask: [B, T + R] bool -> [B, T + R, H]
        return self.feed_forward(self.self_attention(hidden, hidden, mask))

    def forward_two(
        self, text: torch.Tensor, regions: torch.Tensor, text_mask: torch.Tensor, region_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # text: [B, T, H], regions: [B, R, H], masks: [B, T] / [B, R] bool -> ([B, T, H], [B, R, H])
        text = self.self_attention(text, text, text_mask)
        regions = self.self_attention(regions, regions, region_mask)
        if self.cross_attention is not None:
            region_module = self.region_cross_attention or self.cross_attention
            # Both directions read the post-self-attention states, so neither sees the other's update.
            text, regions = (
                self.cross_attention(text, regions, region_mask),
                region_module(regions, text, text_mask),
            )
        return self.feed_forward(text), self.feed_forward(regions)


def init_weights(module: nn.Module, config: SemVLPConfig) -> None:
    """Initialise one freshly built module by `config.init_scheme` ("pytorch": keep what it was built with)."""
    if config.init_scheme == "bert":
        init_bert_style(module, config.initializer_range)


def init_bert_style(module: nn.Module, std: float) -> None:
    """BERT's initialisation: normal(0, std) weights, zero biases, identity LayerNorm, zero padding row."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------- models


@dataclass
class EncoderOutput:
    text_hidden: torch.Tensor  # [B, T, H]
    region_hidden: torch.Tensor  # [B, R, H]
    pooled: torch.Tensor  # [B, H]: tanh(Linear(text [CLS]))


class SemVLPModel(nn.Module):
    """Embeddings, the shared layer stack and the pooler; runs in `mode="single"` or `mode="two"`."""

    def __init__(self, config: SemVLPConfig):
        super().__init__()
        self.config = config
        self.text_embeddings = TextEmbeddings(config)
        self.region_embeddings = RegionEmbeddings(config)
        first_cross = config.num_layers - config.cross_layers
        self.layers = nn.ModuleList(
            SemVLPLayer(config, with_cross_attention=index >= first_cross) for index in range(config.num_layers)
        )
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.apply(lambda module: init_weights(module, config))

    def forward(
        self,
        input_ids: torch.Tensor,
        text_mask: torch.Tensor,
        region_feats: torch.Tensor,
        region_geom: torch.Tensor,
        region_mask: torch.Tensor,
        mode: Mode,
        token_type_ids: torch.Tensor | None = None,
    ) -> EncoderOutput:
        # input_ids, text_mask: [B, T]; region_feats: [B, R, D]; region_geom: [B, R, G]; region_mask: [B, R]
        self._check_inputs(input_ids, region_feats, region_geom, mode)
        text = self.text_embeddings(input_ids, token_type_ids)  # [B, T, H]
        regions = self.region_embeddings(region_feats, region_geom)  # [B, R, H]
        text_mask, region_mask = text_mask.bool(), region_mask.bool()
        if mode == "single":
            hidden = torch.cat([text, regions], dim=1)  # [B, T + R, H]
            mask = torch.cat([text_mask, region_mask], dim=1)  # [B, T + R]
            for layer in self.layers:
                hidden = layer.forward_single(hidden, mask)
            text, regions = hidden.split([text.shape[1], regions.shape[1]], dim=1)
        else:
            for layer in self.layers:
                text, regions = layer.forward_two(text, regions, text_mask, region_mask)
        pooled = torch.tanh(self.pooler(text[:, 0]))  # [B, H]
        return EncoderOutput(text_hidden=text, region_hidden=regions, pooled=pooled)

    def _check_inputs(
        self, input_ids: torch.Tensor, region_feats: torch.Tensor, region_geom: torch.Tensor, mode: str
    ) -> None:
        config = self.config
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if input_ids.shape[1] > config.max_position_embeddings:
            raise ValueError(
                f"text length {input_ids.shape[1]} exceeds max_position_embeddings {config.max_position_embeddings}"
            )
        if region_feats.shape[-1] != config.region_feature_dim:
            raise ValueError(
                f"region features are {region_feats.shape[-1]}-d, model expects {config.region_feature_dim}"
            )
        if region_geom.shape[-1] != config.box_dim:
            raise ValueError(f"region geometry is {region_geom.shape[-1]}-d, model expects box_dim {config.box_dim}")


class PredictionTransform(nn.Module):
    """BERT's head transform: Linear, activation, LayerNorm."""

    def __init__(self, config: SemVLPConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = ACTIVATIONS[config.hidden_act]()
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(self.activation(self.dense(x)))


class MaskedLMHead(nn.Module):
    """BERT's masked-LM head; the decoder matrix is the word embedding matrix (tied), plus a bias."""

    def __init__(self, config: SemVLPConfig):
        super().__init__()
        self.transform = PredictionTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, text_hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        # text_hidden: [..., H] (e.g. [B, T, H]), word_embeddings: [V, H] -> [..., V]
        return F.linear(self.transform(text_hidden), word_embeddings, self.bias)


class MaskedObjectHead(nn.Module):
    """LXMERT's masked-object head: one transform, then feature regression and detector-label logits."""

    def __init__(self, config: SemVLPConfig):
        super().__init__()
        self.transform = PredictionTransform(config)
        self.feature = nn.Linear(config.hidden_size, config.region_feature_dim)
        self.object = nn.Linear(config.hidden_size, config.num_object_labels) if config.num_object_labels else None
        self.attribute = (
            nn.Linear(config.hidden_size, config.num_attribute_labels) if config.num_attribute_labels else None
        )

    def forward(self, region_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        # region_hidden: [..., H] (e.g. [B, R, H]) -> ([..., D], [..., C] | None, [..., A] | None)
        x = self.transform(region_hidden)
        objects = self.object(x) if self.object is not None else None
        attributes = self.attribute(x) if self.attribute is not None else None
        return self.feature(x), objects, attributes


class AnswerHead(nn.Module):
    """LXMERT's answer classifier on the pooled output: Linear(H, 2H), activation, LayerNorm, Linear(2H, N)."""

    def __init__(self, config: SemVLPConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, 2 * config.hidden_size)
        self.activation = ACTIVATIONS[config.hidden_act]()
        self.layer_norm = nn.LayerNorm(2 * config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(2 * config.hidden_size, config.num_answers)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        # pooled: [B, H] -> [B, N]
        return self.classifier(self.layer_norm(self.activation(self.dense(pooled))))


@dataclass
class PreTrainingOutput:
    text_hidden: torch.Tensor  # [B, T, H]
    region_hidden: torch.Tensor  # [B, R, H]
    pooled: torch.Tensor  # [B, H]
    # The masked-LM logits are [B, T, V], or [M, V] at the M positions of `mlm_positions` (row-major
    # order) when the forward pass was given them; the masked-object predictions likewise are [B, R, ...],
    # or [K, ...] at the K positions of `object_positions`.
    mlm_logits: torch.Tensor  # [B, T, V] | [M, V]
    obj_feat_pred: torch.Tensor  # [B, R, D] | [K, D]
    obj_logits: torch.Tensor | None  # [B, R, C] | [K, C]; None when num_object_labels == 0
    attr_logits: torch.Tensor | None  # [B, R, A] | [K, A]; None when num_attribute_labels == 0
    itm_logits: torch.Tensor  # [B, 2]; index 1 = image and text match
    qa_logits: torch.Tensor | None  # [B, N]; None when num_answers == 0
    mlm_positions: torch.Tensor | None = None  # [B, T] bool: where mlm_logits were computed; None = everywhere
    object_positions: torch.Tensor | None = None  # [B, R] bool: where object predictions were; None = everywhere


class SemVLPForPreTraining(nn.Module):
    """The encoder plus the pre-training heads: masked LM, masked objects, image-text matching, image QA.

    Saved as safetensors (no pickle: loading a shared model cannot run code). `save_pretrained(dir)`
    writes `config.json` and `model.safetensors` as Hugging Face models do; `save_checkpoint(path)`
    writes one safetensors file with the config and any JSON metadata (answer table, phase history)
    in its header, as the workflow's phases do.
    """

    def __init__(self, config: SemVLPConfig):
        super().__init__()
        self.config = config
        self.encoder = SemVLPModel(config)
        self.mlm_head = MaskedLMHead(config)
        self.object_head = MaskedObjectHead(config)
        self.itm_head = nn.Linear(config.hidden_size, 2)
        self.qa_head = AnswerHead(config) if config.num_answers else None
        for head in (self.mlm_head, self.object_head, self.itm_head, self.qa_head):  # the encoder inits itself
            if head is not None:
                head.apply(lambda module: init_weights(module, config))

    def forward(
        self,
        input_ids: torch.Tensor,
        text_mask: torch.Tensor,
        region_feats: torch.Tensor,
        region_geom: torch.Tensor,
        region_mask: torch.Tensor,
        mode: Mode,
        token_type_ids: torch.Tensor | None = None,
        mlm_positions: torch.Tensor | None = None,
        object_positions: torch.Tensor | None = None,
    ) -> PreTrainingOutput:
        """Encode and run every head.

        The losses read the masked-LM logits only at masked tokens and the masked-object predictions only
        at masked regions. Given those positions (`mlm_positions` [B, T] bool, `object_positions` [B, R]
        bool), the two heads run there alone: with 15% masking that removes most of the heads' work (the
        vocabulary projection above all). The encoder and the other heads are unaffected.
        """
        encoded = self.encoder(input_ids, text_mask, region_feats, region_geom, region_mask, mode, token_type_ids)
        text_hidden, region_hidden = encoded.text_hidden, encoded.region_hidden
        if mlm_positions is not None:
            mlm_positions = _positions(mlm_positions, input_ids.shape, "mlm_positions")
            text_hidden = text_hidden[mlm_positions]  # [M, H]
        if object_positions is not None:
            object_positions = _positions(object_positions, region_mask.shape, "object_positions")
            region_hidden = region_hidden[object_positions]  # [K, H]
        mlm_logits = self.mlm_head(text_hidden, self.encoder.text_embeddings.word_embeddings.weight)
        obj_feat_pred, obj_logits, attr_logits = self.object_head(region_hidden)
        return PreTrainingOutput(
            text_hidden=encoded.text_hidden,
            region_hidden=encoded.region_hidden,
            pooled=encoded.pooled,
            mlm_logits=mlm_logits,
            obj_feat_pred=obj_feat_pred,
            obj_logits=obj_logits,
            attr_logits=attr_logits,
            itm_logits=self.itm_head(encoded.pooled),
            qa_logits=self.qa_head(encoded.pooled) if self.qa_head is not None else None,
            mlm_positions=mlm_positions,
            object_positions=object_positions,
        )


    def save_pretrained(self, out_dir: str | Path, **metadata: Any) -> Path:
        """`config.json` and `model.safetensors` (with `metadata` in its header) into `out_dir`."""
        out_dir = Path(out_dir)
        write_json(out_dir / CONFIG_NAME, self.config.to_dict(), indent=2)
        save_weights(self, out_dir / WEIGHTS_NAME, self.config, **metadata)
        return out_dir

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> SemVLPForPreTraining:
        """The model `save_pretrained` wrote, in eval mode."""
        model_dir = Path(model_dir)
        config = SemVLPConfig.from_dict(read_json(model_dir / CONFIG_NAME), source=model_dir / CONFIG_NAME)
        model = cls(config)
        load_weights(model, model_dir / WEIGHTS_NAME)
        return model.eval()

    def save_checkpoint(self, path: str | Path, **metadata: Any) -> None:
        save_weights(self, path, self.config, **metadata)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> tuple[SemVLPForPreTraining, dict[str, Any]]:
        """The model of a `save_checkpoint` file, in eval mode, and the file's metadata (with its `config`)."""
        metadata = read_weights_metadata(path)
        model = cls(SemVLPConfig.from_dict(metadata["config"], source=path))
        load_weights(model, path)
        return model.eval(), metadata


def _positions(positions: torch.Tensor, shape: torch.Size, name: str) -> torch.Tensor:
    """`positions` as a bool mask, checked against the [B, L] shape of the sequence it selects from."""
    if positions.shape != shape:
        raise ValueError(f"{name} has shape {tuple(positions.shape)}, expected {tuple(shape)}")
    return positions.bool()


# ------------------------------------------------------------------------------------ saving, loading

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# The header key that marks a SemVLP weights file; its value is JSON: format, config, metadata.
METADATA_KEY = "semvlp"
WEIGHTS_FORMAT = 1


def save_weights(module: nn.Module, path: str | Path, config: SemVLPConfig, **metadata: Any) -> None:
    """`module`'s state dict as safetensors, with the model config and `metadata` (JSON values) in
    the header; written atomically."""
    from safetensors.torch import save

    header = {"format": WEIGHTS_FORMAT, "config": config.to_dict(), **metadata}
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in module.state_dict().items()}
    # serialised in memory, then written by Python: a full disk or a refused write raises an OSError
    # that atomic_path turns into one clear message
    data = save(tensors, metadata={METADATA_KEY: json.dumps(header)})
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def read_weights_metadata(path: str | Path) -> dict[str, Any]:
    """The header metadata of a SemVLP safetensors file (format, config, ...); reads no tensor."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path)
    try:
        with safe_open(str(path), framework="pt") as file:
            header = file.metadata() or {}
    except Exception as err:  # a pickle, a truncated or a corrupted file
        raise InputError(f"not a safetensors file ({err})", path) from None
    if METADATA_KEY not in header:
        raise InputError(f"not a SemVLP weights file (no '{METADATA_KEY}' metadata in its header)", path)
    try:
        metadata = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise InputError(f"SemVLP metadata is not valid JSON ({err})", path) from None
    if not isinstance(metadata, dict) or metadata.get("format") != WEIGHTS_FORMAT or "config" not in metadata:
        raise InputError(f"unsupported SemVLP weights format (expected format {WEIGHTS_FORMAT} with a config)", path)
    return metadata


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Load a safetensors file onto `module`, in place; every tensor must fit and none may be missing."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as err:
        raise InputError(f"not a safetensors file ({err})", path) from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        problem = " ".join(str(err).split())
        raise InputError(f"weights do not fit the model ({problem[:300]})", path) from None


# --------------------------------------------------------------------------------------- BERT loading


@dataclass
class BertLoadReport:
    """What `load_bert_checkpoint` did, by our parameter names (relative to the module passed in)."""

    source: str  # the checkpoint's weights file
    loaded: list[str]  # our parameters copied from the checkpoint
    fresh: list[str]  # our parameters left as initialised (cross-attention, regions, heads BERT lacks)
    unused: list[str]  # checkpoint tensors that have no place in our model

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Our parameter name (inside SemVLPModel / SemVLPForPreTraining) -> BERT's, per sub-module.
_BERT_EMBEDDING_NAMES = {
    "text_embeddings.word_embeddings": "embeddings.word_embeddings",
    "text_embeddings.position_embeddings": "embeddings.position_embeddings",
    "text_embeddings.token_type_embeddings": "embeddings.token_type_embeddings",
    "text_embeddings.layer_norm": "embeddings.LayerNorm",
    "pooler": "pooler.dense",
}
_BERT_LAYER_NAMES = {
    "self_attention.query": "attention.self.query",
    "self_attention.key": "attention.self.key",
    "self_attention.value": "attention.self.value",
    "self_attention.output": "attention.output.dense",
    "self_attention.layer_norm": "attention.output.LayerNorm",
    "feed_forward.intermediate": "intermediate.dense",
    "feed_forward.output": "output.dense",
    "feed_forward.layer_norm": "output.LayerNorm",
}
_BERT_MLM_NAMES = {
    "mlm_head.transform.dense": "cls.predictions.transform.dense",
    "mlm_head.transform.layer_norm": "cls.predictions.transform.LayerNorm",
    "mlm_head.bias": "cls.predictions.bias",
}
# Tensors a BERT checkpoint may hold that carry nothing to load: buffers, and the MLM decoder,
# which is tied to the word embeddings (ours is too).
_BERT_SKIPPED = re.compile(r"(position_ids|token_type_ids)$|^cls\.predictions\.decoder\.")


def _read_bert_state(checkpoint_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    safetensors_path = checkpoint_dir / "model.safetensors"
    torch_path = checkpoint_dir / "pytorch_model.bin"
    try:
        if safetensors_path.is_file():
            from safetensors.torch import load_file

            return load_file(str(safetensors_path)), safetensors_path
        if torch_path.is_file():
            return torch.load(torch_path, map_location="cpu", weights_only=True), torch_path
    except Exception as err:  # a truncated or foreign file: say which one
        path = safetensors_path if safetensors_path.is_file() else torch_path
        raise InputError(f"cannot read checkpoint weights ({err})", path) from None
    raise InputError("no model.safetensors or pytorch_model.bin in the checkpoint directory", checkpoint_dir)


def _normalise_bert_keys(state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Strip the model prefix (`bert.` in BertForPreTraining) and rename old gamma/beta LayerNorm names."""
    anchor = "embeddings.word_embeddings.weight"
    prefixes = [key[: -len(anchor)] for key in state if key.endswith(anchor)]
    if len(prefixes) != 1:
        raise InputError(f"not a BERT-layout checkpoint (expected one '*{anchor}' tensor)", source)
    prefix = prefixes[0]
    normalised = {}
    for key, tensor in state.items():
        key = key[len(prefix) :] if key.startswith(prefix) else key
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))
        normalised[key] = tensor
    return normalised


def load_bert_checkpoint(model: nn.Module, checkpoint_dir: str | Path) -> BertLoadReport:
    """Copy a local BERT-family checkpoint (transformers format) onto a SemVLP model, in place.

    `model` is a `SemVLPModel` or a module holding one as `.encoder` (e.g. `SemVLPForPreTraining`).
    Embeddings, the first `num_layers` encoder layers, the pooler and, when both sides have one, the
    masked-LM head are copied; cross-attention and region parts keep their fresh initialisation.
    A checkpoint with more positions than ours gives its first `max_position_embeddings` rows.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if isinstance(model, SemVLPModel):
        encoder_prefix = ""
    elif isinstance(getattr(model, "encoder", None), SemVLPModel):
        encoder_prefix = "encoder."
    else:
        raise TypeError(f"expected a SemVLPModel or a module with one as .encoder, got {type(model).__name__}")
    raw_state, source = _read_bert_state(checkpoint_dir)
    state = _normalise_bert_keys(raw_state, source)

    names = {encoder_prefix + ours: theirs for ours, theirs in _BERT_EMBEDDING_NAMES.items()}
    for index in range(len(model.get_submodule(encoder_prefix + "layers"))):
        for ours, theirs in _BERT_LAYER_NAMES.items():
            names[f"{encoder_prefix}layers.{index}.{ours}"] = f"encoder.layer.{index}.{theirs}"
    names.update(_BERT_MLM_NAMES)

    loaded: list[str] = []
    used: set[str] = set()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            module_name, _, leaf = name.rpartition(".")
            key = f"{names[module_name]}.{leaf}" if module_name in names else names.get(name)
            if key is None or key not in state:
                continue
            tensor = state[key]
            if key == "embeddings.position_embeddings.weight" and tensor.shape[0] > param.shape[0]:
                tensor = tensor[: param.shape[0]]
            if tensor.shape != param.shape:
                raise InputError(
                    f"tensor {key} has shape {tuple(tensor.shape)}, model parameter {name} needs {tuple(param.shape)}",
                    source,
                )
            param.copy_(tensor)
            loaded.append(name)
            used.add(key)
    loaded_set = set(loaded)
    fresh = [name for name in params if name not in loaded_set]
    unused = sorted(key for key in state if key not in used and not _BERT_SKIPPED.search(key))
    return BertLoadReport(source=str(source), loaded=loaded, fresh=fresh, unused=unused)
