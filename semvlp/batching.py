"""Turning corpus/task records into model inputs: region features from the HDF5 stores, token ids."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterable, Iterator

import h5py
import numpy as np
import tokenizers
import torch

from semvlp.errors import InputError
from semvlp.features import BOX_ARRAYS, FeatureReader
from semvlp.model import box_geometry


class RegionBank:
    """Region features of one or more image sets, looked up by (image set, image id).

    Readers open their HDF5 files lazily, so a bank can be built before DataLoader workers fork.
    """

    def __init__(self, paths: dict[str, str | Path], box_dim: int):
        self.paths = {name: Path(path) for name, path in paths.items()}
        self.readers = {name: FeatureReader(path) for name, path in self.paths.items()}
        self.box_dim = box_dim
        dims = {r.feature_dim for r in self.readers.values()}
        if len(dims) != 1:
            raise InputError(f"feature files disagree on the feature dimension: {sorted(dims)}", ", ".join(map(str, paths.values())))
        self.feature_dim = dims.pop()
        self.max_boxes = max(r.max_boxes for r in self.readers.values())
        # batches keep the stores' dtype (float16 as extracted): the model widens features on its device
        self.feature_dtype = np.result_type(*(r.feature_dtype for r in self.readers.values()))

    def check_ids(self, keys: list[tuple[str, str]], source: str | Path) -> None:
        """Fail early, naming the first image a record needs that has no features."""
        for image_set, img_id in keys:
            if img_id not in self.readers[image_set]:
                raise InputError(
                    f"image '{img_id}' has no region features in {self.paths[image_set]}", source
                )

    def label_counts(self) -> tuple[int, int]:
        """Object and attribute label-space sizes (largest id seen + 1) over all stores."""
        objects = attributes = 1
        for path in self.paths.values():
            with h5py.File(path, "r") as f:
                # read in slabs: a paper-scale store has millions of rows
                for start in range(0, f["obj_ids"].shape[0], 4096):
                    objects = max(objects, int(f["obj_ids"][start : start + 4096].max(initial=0)) + 1)
                    attributes = max(attributes, int(f["attr_ids"][start : start + 4096].max(initial=0)) + 1)
        return objects, attributes

    def region_mask(self, keys: list[tuple[str, str]]) -> torch.Tensor:
        """[B, K] bool, True for the real regions of each image: from the stores' box counts, no read."""
        num_boxes = np.array([self.readers[image_set].num_boxes[self.readers[image_set].index(img_id)] for image_set, img_id in keys], np.int64)
        return torch.from_numpy(np.arange(self.max_boxes)[None, :] < num_boxes.reshape(-1, 1))

    def batch(self, keys: list[tuple[str, str]], features_out: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """Padded region tensors for a list of (image set, image id), gathered per image set in one call.

        Features keep the stores' dtype; they are read into `features_out` ([B, K, D]) when given.
        """
        n, k = len(keys), self.max_boxes
        # uninitialised: the gather writes every slot of a store's boxes, and other slots are zeroed below
        arrays = {name: np.empty((n, k, *shape), dtype) for name, (shape, dtype) in BOX_ARRAYS.items()}
        if features_out is not None and (features_out.shape != (n, k, self.feature_dim) or features_out.dtype != self.feature_dtype):
            raise ValueError(f"features_out is {features_out.dtype} {features_out.shape}, the batch {self.feature_dtype} {(n, k, self.feature_dim)}")
        arrays["features"] = np.empty((n, k, self.feature_dim), self.feature_dtype) if features_out is None else features_out
        num_boxes, img_w, img_h = np.zeros(n, np.int64), np.ones(n, np.int64), np.ones(n, np.int64)
        positions_of: dict[str, list[int]] = {}
        for position, (image_set, _) in enumerate(keys):
            positions_of.setdefault(image_set, []).append(position)
        for image_set, positions in positions_of.items():
            reader = self.readers[image_set]
            rows = np.array([reader.index(keys[p][1]) for p in positions], np.int64)
            if reader.max_boxes < k:  # a store with fewer box slots than the bank: its slots stay zero
                for values in arrays.values():
                    values[positions, reader.max_boxes :] = 0
            if len(positions) == n:
                reader.gather(rows, arrays)
            else:
                part = {name: values[positions] for name, values in arrays.items()}
                reader.gather(rows, part)
                for name, values in part.items():
                    arrays[name][positions] = values
            widths, heights = reader.image_sizes
            num_boxes[positions], img_w[positions], img_h[positions] = reader.num_boxes[rows], widths[rows], heights[rows]
        mask = np.arange(k)[None, :] < num_boxes[:, None]  # [B, K]
        geom = box_geometry(arrays["boxes"], img_w[:, None], img_h[:, None], self.box_dim) * mask[..., None]
        return {
            "region_feats": torch.from_numpy(arrays["features"]),  # [B, K, D]
            "region_geom": torch.from_numpy(np.ascontiguousarray(geom, np.float32)),  # [B, K, box_dim]
            "region_mask": torch.from_numpy(mask),  # [B, K]
            "obj_labels": torch.from_numpy(arrays["obj_ids"]),
            "obj_confs": torch.from_numpy(arrays["obj_confs"]),
            "attr_labels": torch.from_numpy(arrays["attr_ids"]),
            "attr_confs": torch.from_numpy(arrays["attr_confs"]),
        }


ENCODER_KEYS = ("input_ids", "text_mask", "region_feats", "region_geom", "region_mask")


def encoder_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a batch the encoder reads (batches also carry targets)."""
    return {key: batch[key] for key in ENCODER_KEYS}


class TokenizedText:
    """Sentences tokenised once, as flat arrays: a batch's token ids are then a gather, where a
    tokenizer call per batch would cost more than the batch's region reads.

    `batch(rows)` gives what `encode_text` gives for those sentences: each truncated to max_length
    with its [CLS]/[SEP], padded to the batch's longest.
    """

    def __init__(self, tokenizer, sentences: Iterable[str], max_length: int, chunk: int = 65536):
        self.pad_token_id = tokenizer.pad_token_id
        dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
        # the Rust tokenizer itself (a copy, truncating as the transformers call does): twice as fast
        # over LXMERT's 9.18M sentences, which a phase tokenises when it starts
        backend = tokenizers.Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.no_padding()
        backend.enable_truncation(max_length)
        ids, special, lengths = [], [], []
        for part in _chunks(sentences, chunk):
            encodings = backend.encode_batch_fast(part)
            counts = np.array([len(e.ids) for e in encodings], np.int64)
            ids.append(np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype, count=int(counts.sum())))
            special.append(np.fromiter(itertools.chain.from_iterable(e.special_tokens_mask for e in encodings), np.bool_, count=int(counts.sum())))
            lengths.append(counts)
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)  # (N,)
        self.starts = np.cumsum(self.lengths) - self.lengths  # (N,)
        self.ids = np.concatenate(ids) if ids else np.zeros(0, dtype)  # (total tokens,)
        self.special = np.concatenate(special) if special else np.zeros(0, np.bool_)

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        lengths = self.lengths[rows]
        present = np.arange(lengths.max(initial=0))[None, :] < lengths[:, None]  # [B, T]
        at = np.where(present, self.starts[rows][:, None] + np.arange(present.shape[1])[None, :], 0)
        return {
            "input_ids": torch.from_numpy(np.where(present, self.ids[at], self.pad_token_id).astype(np.int64)),
            "text_mask": torch.from_numpy(present),
            "special_tokens_mask": torch.from_numpy(np.where(present, self.special[at], True)),
        }


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def encode_text(tokenizer, sentences: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Token ids [B, T] (padded to the longest, at most max_length), mask and special-token mask."""
    enc = tokenizer(
        sentences,
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_special_tokens_mask=True,
        return_tensors="pt",
    )
    return {
        "input_ids": enc["input_ids"],
        "text_mask": enc["attention_mask"].bool(),
        "special_tokens_mask": enc["special_tokens_mask"].bool(),
    }
