"""Turning corpus/task records into model inputs: region features from the HDF5 stores, token ids."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
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

    def batch(self, keys: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        """Padded region tensors for a list of (image set, image id), gathered per image set in one call."""
        n, k = len(keys), self.max_boxes
        arrays = {name: np.zeros((n, k, *shape), dtype) for name, (shape, dtype) in BOX_ARRAYS.items()}
        arrays["features"] = np.zeros((n, k, self.feature_dim), np.float32)
        num_boxes, img_w, img_h = np.zeros(n, np.int64), np.ones(n, np.int64), np.ones(n, np.int64)
        positions_of: dict[str, list[int]] = {}
        for position, (image_set, _) in enumerate(keys):
            positions_of.setdefault(image_set, []).append(position)
        for image_set, positions in positions_of.items():
            reader = self.readers[image_set]
            rows = np.array([reader.index(keys[p][1]) for p in positions], np.int64)
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
