"""HDF5 region-feature store (writer, sharded store index, lazy reader) and LXMERT TSV import/export.

One HDF5 file per image set holds N images with at most K boxes each, as dense arrays:

    img_ids              (N,)        utf-8 variable-length strings, the image file stem
    img_h, img_w         (N,)        int64, image size in pixels
    num_boxes            (N,)        int64, n <= K boxes kept for the image
    boxes                (N, K, 4)   float32, pixels x1, y1, x2, y2
    features             (N, K, D)   float16 or float32, one chunk per image, uncompressed
    obj_ids, attr_ids    (N, K)      int64, detector class / attribute ids
    obj_confs, attr_confs(N, K)      float32, their confidences

Rows n..K-1 of an image are zero padding. File attributes hold the caller's provenance (detector
config and weight digests, selection settings, ...) plus what the writer adds (`WRITER_KEYS`).

Why this layout (REFERENCE.md, "Region features"): one chunk per image makes a random image one read;
gzip on features would cost CPU on every read for little gain on float activations; a dense array needs
no index; and the reader opens the file lazily in each process, because an h5py handle opened before
a DataLoader fork must not be used in the worker. The whole store is never loaded into memory,
unlike LXMERT's TSV loader, which decodes every image into RAM in every process.

Sharded stores: extraction writes one such file per shard; `write_store_index` then writes a small
HDF5 file that holds the per-image arrays and the common provenance, and whose per-box datasets are
HDF5 virtual datasets over the shards (paths relative to the index). No feature is copied; any HDF5
tool reads the index as one file, and `FeatureReader` reads it like a single file.

Reading speed: the reader reads the uncompressed datasets of every file without HDF5 (their byte
offsets come from HDF5: one for a contiguous dataset, one per chunk for the one-image chunks of
`features`). An image's features are one pread straight into the batch; the small per-box arrays are
a numpy gather from a read-only memory map. Both come from the page cache, shared by every process
that reads the file, with no HDF5 call per image. A dataset HDF5 must decode (compressed, or not yet
allocated) is read through h5py.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import errno
import json
import os
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

import semvlp
from semvlp.errors import InputError
from semvlp.io import atomic_path

FEATURE_DTYPES = ("float16", "float32")

# Attributes the writer adds to every file; a caller's provenance may repeat them only with equal values.
WRITER_KEYS = ("feature_dim", "feature_dtype", "max_boxes", "semvlp_version", "created_utc")
# Attribute listing (as JSON) the provenance keys whose values are stored as JSON strings.
_JSON_KEYS_ATTR = "_json_keys"

# Per-box arrays other than features: name -> (trailing shape of one box, dtype).
BOX_ARRAYS: dict[str, tuple[tuple[int, ...], type]] = {
    "boxes": ((4,), np.float32),
    "obj_ids": ((), np.int64),
    "obj_confs": ((), np.float32),
    "attr_ids": ((), np.int64),
    "attr_confs": ((), np.float32),
}
_PER_IMAGE_INTS = ("img_h", "img_w", "num_boxes")
# The per-box arrays a batch gathers, features last.
ROW_ARRAYS = (*BOX_ARRAYS, "features")
# Attribute of a store index: its shard files (relative to the index's folder) and their row counts.
_SHARDS_ATTR = "store_shards"

# LXMERT's TSV columns, in file order.
TSV_FIELDS = (
    "img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
    "num_boxes", "boxes", "features",
)
# TSV array column (other than features) -> (our field, little-endian dtype as LXMERT writes it).
_TSV_ARRAYS: dict[str, tuple[str, str]] = {
    "objects_id": ("obj_ids", "<i8"),
    "objects_conf": ("obj_confs", "<f4"),
    "attrs_id": ("attr_ids", "<i8"),
    "attrs_conf": ("attr_confs", "<f4"),
    "boxes": ("boxes", "<f4"),
}


@dataclass
class RegionRecord:
    """One image's kept boxes (n = number of boxes) and the detector's outputs for them."""

    img_id: str
    img_h: int
    img_w: int
    boxes: np.ndarray  # (n, 4) float32, pixels x1, y1, x2, y2
    features: np.ndarray  # (n, D)
    obj_ids: np.ndarray  # (n,) int64
    obj_confs: np.ndarray  # (n,) float32
    attr_ids: np.ndarray  # (n,) int64
    attr_confs: np.ndarray  # (n,) float32

    def __post_init__(self) -> None:
        for name, (_, dtype) in BOX_ARRAYS.items():
            setattr(self, name, np.asarray(getattr(self, name), dtype=dtype))
        self.features = np.asarray(self.features)
        n = self.num_boxes
        for name, (box_shape, _) in BOX_ARRAYS.items():
            if getattr(self, name).shape != (n, *box_shape):
                raise ValueError(
                    f"{self.img_id}: {name} has shape {getattr(self, name).shape}, expected {(n, *box_shape)}"
                )
        if self.features.ndim != 2 or self.features.shape[0] != n:
            raise ValueError(f"{self.img_id}: features have shape {self.features.shape}, expected ({n}, D)")

    @property
    def num_boxes(self) -> int:
        return int(self.boxes.shape[0])


# --------------------------------------------------------------------------------------------------
# Provenance attributes


def _plain(value: Any) -> Any:
    """Numpy scalars -> Python scalars, tuples -> lists (recursively), so values compare like JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _encode_attrs(provenance: dict[str, Any]) -> dict[str, Any]:
    """Provenance -> HDF5 attribute values: scalars as themselves, anything else as a JSON string."""
    attrs: dict[str, Any] = {}
    json_keys = []
    for key, value in provenance.items():
        if not isinstance(key, str) or key == _JSON_KEYS_ATTR:
            raise ValueError(f"provenance key {key!r} is not allowed")
        value = _plain(value)
        if isinstance(value, (str, bool, int, float)):
            attrs[key] = value
        else:
            try:
                attrs[key] = json.dumps(value)
            except TypeError as err:
                raise ValueError(f"provenance {key!r} cannot be stored: {err}") from None
            json_keys.append(key)
    attrs[_JSON_KEYS_ATTR] = json.dumps(json_keys)
    return attrs


def _decode_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    json_keys = set(json.loads(attrs.get(_JSON_KEYS_ATTR, "[]")))
    provenance = {}
    for key, value in attrs.items():
        if key == _JSON_KEYS_ATTR:
            continue
        value = _plain(value)
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        provenance[key] = json.loads(value) if key in json_keys else value
    return provenance


# --------------------------------------------------------------------------------------------------
# Writer


class FeatureWriter:
    """Writes one feature file row by row; the file appears at `path` only when every row is written.

        with FeatureWriter(path, num_images=N, max_boxes=K, feature_dim=D, provenance={...}) as writer:
            writer.write(index, record)   # for every index in 0..N-1, in any order

    Data go to a temporary file in the same directory, renamed on a clean exit. An exception inside
    the block, or rows left unwritten, leave no file at `path`.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        num_images: int,
        max_boxes: int,
        feature_dim: int,
        feature_dtype: str = "float16",
        provenance: dict[str, Any],
    ):
        if feature_dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature_dtype must be one of {FEATURE_DTYPES}, got {feature_dtype!r}")
        if num_images < 0 or max_boxes < 1 or feature_dim < 1:
            raise ValueError(
                f"need num_images >= 0, max_boxes >= 1, feature_dim >= 1; "
                f"got {num_images}, {max_boxes}, {feature_dim}"
            )
        self.path = Path(path)
        self.num_images = num_images
        self.max_boxes = max_boxes
        self.feature_dim = feature_dim
        self.feature_dtype = feature_dtype
        written_by = {
            "feature_dim": feature_dim,
            "feature_dtype": feature_dtype,
            "max_boxes": max_boxes,
            "semvlp_version": semvlp.__version__,
        }
        for key, value in written_by.items():
            if key in provenance and _plain(provenance[key]) != value:
                raise ValueError(f"provenance {key!r}={provenance[key]!r} contradicts the writer's {value!r}")
        # Encoded now so that a bad provenance value fails before any file is created.
        self._attrs = _encode_attrs({**provenance, **written_by})
        self._written = np.zeros(num_images, dtype=bool)  # (N,)
        self._row_of_id: dict[str, int] = {}
        self._stack: contextlib.ExitStack | None = None
        self._datasets: dict[str, h5py.Dataset] = {}

    def __enter__(self) -> FeatureWriter:
        n, k, d = self.num_images, self.max_boxes, self.feature_dim
        self._check_free_space()
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(atomic_path(self.path))
            # Entered after atomic_path, so it is closed before the rename.
            h5 = stack.enter_context(h5py.File(tmp, "w", track_order=True))
            h5.attrs.update(self._attrs)
            h5.attrs["created_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            data = self._datasets
            data["img_ids"] = h5.create_dataset("img_ids", shape=(n,), dtype=h5py.string_dtype("utf-8"))
            for name in _PER_IMAGE_INTS:
                data[name] = h5.create_dataset(name, shape=(n,), dtype=np.int64)
            for name, (box_shape, dtype) in BOX_ARRAYS.items():
                data[name] = h5.create_dataset(name, shape=(n, k, *box_shape), dtype=dtype)
            # maxshape=None on the image axis lets an empty shard (N = 0) keep the one-image chunks.
            data["features"] = h5.create_dataset(
                "features", shape=(n, k, d), maxshape=(None, k, d), chunks=(1, k, d), dtype=self.feature_dtype
            )
            self._stack = stack.pop_all()
        return self

    def _check_free_space(self) -> None:
        """Refuse to start a file the disk cannot hold: HDF5 failing to close a file on a full disk
        crashes the interpreter at exit instead of raising."""
        n, k, d = self.num_images, self.max_boxes, self.feature_dim
        per_box = d * np.dtype(self.feature_dtype).itemsize + 4 * 4 + 2 * 8 + 2 * 4  # features, box, ids, confs
        needed = n * (k * per_box + 3 * 8 + 64) + (1 << 16)  # + per-image ints, id string, metadata
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free < needed:
            raise OSError(errno.ENOSPC, f"disk full: no space left on device for this feature file (needs about {needed} bytes, {free} free)", str(self.path))

    def write(self, index: int, record: RegionRecord) -> None:
        """Store `record` as row `index`, zero-padded to max_boxes."""
        if self._stack is None:
            raise RuntimeError("FeatureWriter.write() is only valid inside its `with` block")
        if not 0 <= index < self.num_images:
            raise IndexError(f"row {index} is outside 0..{self.num_images - 1}")
        if self._written[index]:
            raise ValueError(f"row {index} was already written")
        n = record.num_boxes
        if n > self.max_boxes:
            raise ValueError(f"{record.img_id}: {n} boxes, more than max_boxes={self.max_boxes}")
        if record.features.shape[1] != self.feature_dim:
            raise ValueError(
                f"{record.img_id}: feature dimension {record.features.shape[1]}, expected {self.feature_dim}"
            )
        if record.img_id in self._row_of_id:
            raise ValueError(f"image id {record.img_id!r} already written as row {self._row_of_id[record.img_id]}")
        if self.feature_dtype == "float16" and n and np.abs(record.features).max() > np.finfo(np.float16).max:
            raise ValueError(f"{record.img_id}: features exceed the float16 range; use feature_dtype float32")
        features = record.features.astype(self.feature_dtype)  # (n, D)

        data = self._datasets
        data["img_ids"][index] = record.img_id
        data["img_h"][index] = record.img_h
        data["img_w"][index] = record.img_w
        data["num_boxes"][index] = n
        for name in BOX_ARRAYS:
            data[name][index] = _pad(getattr(record, name), self.max_boxes)
        data["features"][index] = _pad(features, self.max_boxes)
        self._written[index] = True
        self._row_of_id[record.img_id] = index

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack, self._stack = self._stack, None
        self._datasets = {}
        if exc_type is not None:
            return stack.__exit__(exc_type, exc, tb)  # closes and removes the temporary file
        with stack:  # an error raised here also removes the temporary file
            missing = np.flatnonzero(~self._written)
            if missing.size:
                raise RuntimeError(
                    f"{self.path}: {missing.size} of {self.num_images} rows were never written "
                    f"(first: {missing[:5].tolist()}); no file written"
                )
        return False


def _pad(values: np.ndarray, max_boxes: int) -> np.ndarray:
    """(n, ...) -> (max_boxes, ...) with zero rows after n."""
    padded = np.zeros((max_boxes, *values.shape[1:]), dtype=values.dtype)
    padded[: len(values)] = values
    return padded


# --------------------------------------------------------------------------------------------------
# Reader


class FeatureReader:
    """Random access to a feature file by image id.

    The constructor reads the attributes and the small per-image arrays, then closes the file. The data
    handle is opened on first access and reopened when the process id changed, so a reader created
    before a DataLoader forks its workers is safe to use inside them. Pickling drops the handle.
    Files are opened with HDF5's default file locking; on a file system without flock support
    (some NFS setups) set HDF5_USE_FILE_LOCKING=FALSE in the environment.
    """

    def __init__(self, path: str | Path, expect: dict[str, Any] | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError("feature file not found", self.path)
        try:
            h5 = h5py.File(self.path, "r")
        except OSError as err:
            raise InputError(f"cannot open as HDF5 ({err})", self.path) from None
        with h5:
            self.provenance: dict[str, Any] = _decode_attrs(h5.attrs)
            shape = self._check_layout(h5)
            self.ids: list[str] = h5["img_ids"].asstr()[()].tolist()
            self._img_h = h5["img_h"][()]  # (N,) int64
            self._img_w = h5["img_w"][()]  # (N,) int64
            self._num_boxes = h5["num_boxes"][()]  # (N,) int64
            self.feature_dtype: str = str(h5["features"].dtype)
        _, self.max_boxes, self.feature_dim = shape
        if self._num_boxes.size and not 0 <= self._num_boxes.min() <= self._num_boxes.max() <= self.max_boxes:
            raise InputError(f"num_boxes outside 0..{self.max_boxes}", self.path)
        self._row_of_id = {img_id: row for row, img_id in enumerate(self.ids)}
        if len(self._row_of_id) != len(self.ids):
            raise InputError("image ids are not unique", self.path)
        if expect:
            self._check_expected(expect)
        self.shards = self._check_shards()
        self._sources: list[_SourceFile] = []  # opened in each process on first use
        self._pid: int | None = None

    def _check_shards(self) -> list[tuple[Path, int]]:
        """A store index's shard files with their row counts ([] for a single file), each checked to
        exist with the rows and shapes the index expects: a missing shard would read as zeros."""
        listed = self.provenance.get(_SHARDS_ATTR)
        if listed is None:
            return []
        shards, total = [], 0
        for entry in listed:
            path, rows = self.path.parent / entry["file"], entry["rows"]
            if not path.is_file():
                raise InputError(f"shard {entry['file']} of this store is missing ({path})", self.path)
            with h5py.File(path, "r") as h5:
                shape = h5["features"].shape if "features" in h5 else None
            if shape != (rows, self.max_boxes, self.feature_dim):
                raise InputError(
                    f"shard {path} has features of shape {shape}, the store expects {(rows, self.max_boxes, self.feature_dim)} "
                    "(a shard was rewritten after the store was indexed: rerun the index)",
                    self.path,
                )
            shards.append((path, rows))
            total += rows
        if total != len(self):
            raise InputError(f"shards hold {total} rows, the store {len(self)}", self.path)
        return shards

    def _check_layout(self, h5: h5py.File) -> tuple[int, int, int]:
        """Check every dataset is present with consistent shapes; return (N, K, D)."""
        expected_names = ["img_ids", *_PER_IMAGE_INTS, *BOX_ARRAYS, "features"]
        missing = [name for name in expected_names if name not in h5]
        if missing:
            raise InputError(f"not a region-feature file: missing datasets {missing}", self.path)
        features = h5["features"]
        if features.ndim != 3:
            raise InputError(f"features have shape {features.shape}, expected (N, K, D)", self.path)
        n, k, d = features.shape
        expected_shapes = {"img_ids": (n,), **{name: (n,) for name in _PER_IMAGE_INTS}}
        expected_shapes.update({name: (n, k, *box_shape) for name, (box_shape, _) in BOX_ARRAYS.items()})
        for name, expected_shape in expected_shapes.items():
            if h5[name].shape != expected_shape:
                raise InputError(f"dataset {name} has shape {h5[name].shape}, expected {expected_shape}", self.path)
        return n, k, d

    def _check_expected(self, expect: dict[str, Any]) -> None:
        for key, expected in expect.items():
            expected = _plain(expected)
            if key not in self.provenance:
                raise InputError(f"provenance {key!r} is absent, but the config expects {expected!r}", self.path)
            if self.provenance[key] != expected:
                raise InputError(
                    f"provenance {key!r} is {self.provenance[key]!r} in this file, but the config expects "
                    f"{expected!r} (re-extract or import the features with the configured settings)",
                    self.path,
                )

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, img_id: object) -> bool:
        return img_id in self._row_of_id

    def index(self, img_id: str) -> int:
        """Row of `img_id` (a dict lookup)."""
        try:
            return self._row_of_id[img_id]
        except KeyError:
            raise InputError(
                f"image id {img_id!r} is not in this feature file ({len(self)} images)", self.path
            ) from None

    def get(self, img_id: str) -> RegionRecord:
        """The image's kept boxes: only its first num_boxes rows."""
        return self._record_at(self.index(img_id))

    def get_padded(self, img_id: str) -> dict[str, np.ndarray]:
        """All max_boxes rows (padding is zero) plus 0-d "num_boxes", "img_h", "img_w": ready to batch.

        Keys and shapes: boxes (K, 4) float32, features (K, D) in the stored dtype, obj_ids/attr_ids (K,)
        int64, obj_confs/attr_confs (K,) float32, num_boxes/img_h/img_w () int64.
        """
        row = self.index(img_id)
        padded = {name: values[0] for name, values in self.read_rows([row]).items()}
        padded["num_boxes"] = np.asarray(self._num_boxes[row])
        padded["img_h"] = np.asarray(self._img_h[row])
        padded["img_w"] = np.asarray(self._img_w[row])
        return padded

    def _record_at(self, row: int) -> RegionRecord:
        n = int(self._num_boxes[row])
        return RegionRecord(
            img_id=self.ids[row],
            img_h=int(self._img_h[row]),
            img_w=int(self._img_w[row]),
            **{name: values[0, :n] for name, values in self.read_rows([row]).items()},
        )

    def read_rows(self, rows: Sequence[int]) -> dict[str, np.ndarray]:
        """The per-box arrays (`ROW_ARRAYS`) of `rows`, each (len(rows), max_boxes, ...)."""
        out = {name: np.zeros((len(rows), self.max_boxes, *box_shape), dtype) for name, (box_shape, dtype) in BOX_ARRAYS.items()}
        out["features"] = np.zeros((len(rows), self.max_boxes, self.feature_dim), self.feature_dtype)
        self.gather(np.asarray(rows), out)
        return out

    @property
    def num_boxes(self) -> np.ndarray:
        """(N,) boxes kept per image."""
        return self._num_boxes

    @property
    def image_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """(img_w, img_h), each (N,) pixels."""
        return self._img_w, self._img_h

    def gather(self, rows: np.ndarray, out: dict[str, np.ndarray]) -> None:
        """Copy the per-box arrays (`ROW_ARRAYS`) of `rows` into `out[name][i, :max_boxes]`, row i of
        `out` from `rows[i]`; `out` may have more box slots than this file (they are left alone)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and not 0 <= rows.min() <= rows.max() < len(self):
            raise IndexError(f"{self.path}: rows outside 0..{len(self) - 1}")
        for source in self._open():
            inside = (rows >= source.start) & (rows < source.stop)
            if not inside.any():
                continue
            positions = None if inside.all() else np.flatnonzero(inside)
            local = rows[inside] - source.start
            for name in ROW_ARRAYS:
                source.read_into(name, local, out[name][:, : self.max_boxes], positions)

    def _open(self) -> list[_SourceFile]:
        """This process's open files (the file itself, or a store's shards), opened on first use and
        again in a forked process."""
        pid = os.getpid()
        if self._pid != pid:
            # Inherited through fork: a handle shares the parent's open file description, and while it
            # stays open HDF5 would hand that same file back to a new open. Close it, then open our own.
            for source in self._sources:
                source.close()
            self._sources = []
        if not self._sources:
            files = self.shards or [(self.path, len(self))]
            start = 0
            for path, rows in files:
                source = _SourceFile(path, start)
                self._sources.append(source)
                if source.stop - start != rows or source.h5["features"].shape[1:] != (self.max_boxes, self.feature_dim):
                    self.close()
                    raise InputError("the file changed since the reader was created", path)
                start += rows
            self._pid = pid
        return self._sources

    def close(self) -> None:
        """Close the data handles (if this process opened them); the next access reopens them."""
        if self._pid == os.getpid():
            for source in self._sources:
                source.close()
        self._sources, self._pid = [], None

    def __enter__(self) -> FeatureReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_sources=[], _pid=None)  # handles and memory maps stay with their process
        return state


class _RawRows:
    """One uncompressed dataset's rows, read from the file's bytes without HDF5.

    Small rows (boxes, labels) come from a read-only memory map of the file, by a numpy gather when the
    rows lie back to back (a contiguous dataset, or one-image chunks allocated in row order). Large
    rows (an image's features, 147 KB at 36 x 2048 float16) are read with one pread each straight into
    the batch: a process's first touch of a mapped page costs more than copying it, and a pread
    also reads a page-cache miss without a fault per page.
    """

    def __init__(self, path: Path, fd: int, offsets: np.ndarray, row_shape: tuple[int, ...], dtype: np.dtype, whole: np.ndarray | None):
        self.path, self.fd = path, fd
        self.offsets = offsets  # (N,) int64, each row's byte offset in the file
        self.row_shape, self.dtype, self.whole = row_shape, dtype, whole
        self.row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize

    @classmethod
    def of(cls, path: Path, fd: int, file_bytes: np.ndarray, dataset: h5py.Dataset) -> _RawRows | None:
        """The dataset's rows in the file (mapped as uint8 in `file_bytes`), or None where HDF5 must
        decode them (filters, other chunk shapes, unallocated storage)."""
        if dataset.compression or dataset.shuffle or dataset.fletcher32 or dataset.scaleoffset or dataset.dtype.kind not in "fiu":
            return None
        n, row_shape, dtype = dataset.shape[0], dataset.shape[1:], dataset.dtype
        row_bytes = dtype.itemsize * int(np.prod(row_shape))
        if n == 0:
            return cls(path, fd, np.zeros(0, np.int64), row_shape, dtype, np.zeros(dataset.shape, dtype))
        if dataset.chunks is None:
            start = dataset.id.get_offset()
            if start is None:
                return None
            offsets = start + row_bytes * np.arange(n, dtype=np.int64)
        elif dataset.chunks == (1, *row_shape):
            offsets = np.full(n, -1, np.int64)

            def record(info) -> None:
                offsets[info.chunk_offset[0]] = info.byte_offset

            dataset.id.chunk_iter(record)
            if (offsets < 0).any():  # rows never written read as fill values, which only HDF5 knows
                return None
        else:
            return None
        whole = None
        if (np.diff(offsets) == row_bytes).all():
            whole = file_bytes[offsets[0] : offsets[0] + n * row_bytes].view(dtype).reshape(dataset.shape)
        return cls(path, fd, offsets, row_shape, dtype, whole)

    def take(self, rows: np.ndarray, out: np.ndarray, positions: np.ndarray | None = None) -> None:
        """Copy row rows[i] into out[positions[i]] (into out[i] without positions)."""
        if self.whole is not None and self.row_bytes < _PREAD_BYTES:
            if positions is None:
                # mode="clip": rows are checked by the caller, and "raise" would buffer the copy
                np.take(self.whole, rows, axis=0, out=out, mode="clip")
            else:
                out[positions] = self.whole[rows]
            return
        places = range(len(rows)) if positions is None else positions.tolist()
        for position, row in zip(places, rows.tolist()):
            if os.preadv(self.fd, [out[position]], int(self.offsets[row])) != self.row_bytes:
                raise InputError(f"the file ends inside row {row} (truncated?)", self.path)


# Rows of at least this size are read with pread, one by one (an image's features), as are the rows of
# datasets whose rows are not back to back
_PREAD_BYTES = 16 << 10


class _SourceFile:
    """One open feature file (a single file, or one shard of a store) covering rows start..stop-1."""

    def __init__(self, path: Path, start: int):
        self.h5 = h5py.File(path, "r")
        self.start = start
        self.stop = start + self.h5["features"].shape[0]
        self.fd = os.open(path, os.O_RDONLY)
        file_bytes = np.memmap(path, np.uint8, "r")  # one mapping per file, shared by its datasets' views
        self.raw = {name: _RawRows.of(path, self.fd, file_bytes, self.h5[name]) for name in ROW_ARRAYS}

    def close(self) -> None:
        self.h5.close()
        os.close(self.fd)

    def read_into(self, name: str, rows: np.ndarray, out: np.ndarray, positions: np.ndarray | None) -> None:
        """Copy rows (local to this file, any order, repeats allowed) of one per-box array into
        out[positions] (into out without positions)."""
        raw = self.raw[name]
        if raw is not None and raw.dtype == out.dtype:
            raw.take(rows, out, positions)
            return
        if raw is not None:
            values = np.empty((len(rows), *raw.row_shape), raw.dtype)
            raw.take(rows, values)
        else:
            unique, inverse = np.unique(rows, return_inverse=True)  # h5py wants increasing, unique rows
            values = self.h5[name][unique][inverse]
        if positions is None:
            out[...] = values
        else:
            out[positions] = values


# --------------------------------------------------------------------------------------------------
# Sharded store

_ABSENT = "<absent>"


def write_store_index(
    shard_paths: Sequence[str | Path], out_path: str | Path, *, shard_keys: Sequence[str] = ("shard",)
) -> None:
    """Index shard files, in the given order, as one store at `out_path`, copying no feature.

    Every provenance value must agree across shards, except `shard_keys` and the creation time, and
    every image id must be unique. The index keeps the common provenance, lists the shards (relative
    to its folder, so the folder may move as a whole) and holds the per-image arrays; its per-box
    datasets are virtual datasets over the shards.
    """
    if not shard_paths:
        raise ValueError("a store needs at least one shard")
    out_path = Path(out_path)
    readers = [FeatureReader(path) for path in shard_paths]
    ignored = {*shard_keys, "created_utc"}
    reference = {key: value for key, value in readers[0].provenance.items() if key not in ignored}
    for reader in readers[1:]:
        own = {key: value for key, value in reader.provenance.items() if key not in ignored}
        for key in [*reference, *(key for key in own if key not in reference)]:
            ours, theirs = own.get(key, _ABSENT), reference.get(key, _ABSENT)
            if ours != theirs:
                raise InputError(
                    f"provenance {key!r} is {ours!r} in this shard but {theirs!r} in {readers[0].path}", reader.path
                )
    shard_of_id: dict[str, Path] = {}
    for reader in readers:
        if reader.shards:
            raise InputError("is itself a store index; index the shard files", reader.path)
        for img_id in reader.ids:
            if img_id in shard_of_id:
                raise InputError(f"image id {img_id!r} is also in shard {shard_of_id[img_id]}", reader.path)
            shard_of_id[img_id] = reader.path

    first = readers[0]
    n, k, d = len(shard_of_id), first.max_boxes, first.feature_dim
    shards = [{"file": os.path.relpath(reader.path.resolve(), out_path.parent.resolve()), "rows": len(reader)} for reader in readers]
    attrs = _encode_attrs({**reference, _SHARDS_ATTR: shards})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp, h5py.File(tmp, "w", track_order=True) as h5:
        h5.attrs.update(attrs)
        h5.attrs["created_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        h5.create_dataset("img_ids", data=[img_id for reader in readers for img_id in reader.ids], dtype=h5py.string_dtype("utf-8"))
        for name, values in (("img_h", "_img_h"), ("img_w", "_img_w"), ("num_boxes", "_num_boxes")):
            h5.create_dataset(name, data=np.concatenate([getattr(reader, values) for reader in readers]).astype(np.int64))
        shapes = {name: ((k, *box_shape), dtype) for name, (box_shape, dtype) in BOX_ARRAYS.items()}
        shapes["features"] = ((k, d), np.dtype(first.feature_dtype))
        for name, (row_shape, dtype) in shapes.items():
            layout = h5py.VirtualLayout(shape=(n, *row_shape), dtype=dtype)
            start = 0
            for reader, shard in zip(readers, shards):
                if len(reader):
                    layout[start : start + len(reader)] = h5py.VirtualSource(shard["file"], name, shape=(len(reader), *row_shape))
                start += len(reader)
            h5.create_virtual_dataset(name, layout, fillvalue=0)


# --------------------------------------------------------------------------------------------------
# LXMERT TSV


@dataclass
class _TsvSummary:
    num_rows: int
    max_boxes: int
    feature_dim: int


def _tsv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, the 10 fields) of each non-empty line."""
    csv.field_size_limit(sys.maxsize)  # one features field is ~400 kB of base64
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter="\t")
            for fields in reader:
                if not fields:
                    continue  # a blank line, which LXMERT's DictReader skips too
                if len(fields) != len(TSV_FIELDS):
                    raise InputError(
                        f"line {reader.line_num}: {len(fields)} tab-separated fields, expected "
                        f"{len(TSV_FIELDS)} ({', '.join(TSV_FIELDS)})",
                        path,
                    )
                yield reader.line_num, fields
    except (csv.Error, UnicodeDecodeError) as err:
        raise InputError(f"not a readable TSV ({err})", path) from None


def _tsv_int(text: str, field: str, path: Path, line: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"line {line}: {field} is {text!r}, not an integer", path) from None
    if value < 0:
        raise InputError(f"line {line}: {field} is negative ({value})", path)
    return value


def _base64_size(text: str, field: str, path: Path, line: int) -> int:
    """Number of bytes `text` decodes to, from its length alone (the first pass decodes nothing)."""
    if len(text) % 4:
        raise InputError(f"line {line}: {field} is not valid base64 (length {len(text)} is not a multiple of 4)", path)
    return len(text) // 4 * 3 - (len(text) - len(text.rstrip("=")))


def _check_sizes(
    sizes: dict[str, int], num_boxes: int, feature_dim: int | None, path: Path, line: int
) -> int | None:
    """Check the byte size of every array field against num_boxes; return this row's feature dimension."""
    for field, (name, dtype) in _TSV_ARRAYS.items():
        box_shape = BOX_ARRAYS[name][0]
        expected = num_boxes * int(np.prod(box_shape)) * np.dtype(dtype).itemsize
        if sizes[field] != expected:
            raise InputError(
                f"line {line}: {field} holds {sizes[field]} bytes, expected {expected} for num_boxes={num_boxes}", path
            )
    feature_bytes = sizes["features"]
    if num_boxes == 0:
        if feature_bytes:
            raise InputError(f"line {line}: num_boxes is 0 but features hold {feature_bytes} bytes", path)
        return None
    row_dim, remainder = divmod(feature_bytes, 4 * num_boxes)
    if feature_dim is None and (remainder or row_dim == 0):
        raise InputError(
            f"line {line}: features hold {feature_bytes} bytes, expected a positive multiple of "
            f"4 x num_boxes={num_boxes}",
            path,
        )
    if feature_dim is not None and feature_bytes != 4 * num_boxes * feature_dim:
        raise InputError(
            f"line {line}: features hold {feature_bytes} bytes, expected {4 * num_boxes * feature_dim} "
            f"(4 x num_boxes={num_boxes} x feature_dim={feature_dim} of the earlier lines)",
            path,
        )
    return row_dim


def _scan_tsv(path: Path) -> _TsvSummary:
    """First pass: count rows, find the largest box count and the feature dimension; check structure."""
    num_rows, max_boxes, feature_dim = 0, 0, None
    line_of_id: dict[str, int] = {}
    for line, fields in _tsv_rows(path):
        row = dict(zip(TSV_FIELDS, fields))
        for field in ("img_h", "img_w"):
            _tsv_int(row[field], field, path, line)
        num_boxes = _tsv_int(row["num_boxes"], "num_boxes", path, line)
        sizes = {field: _base64_size(row[field], field, path, line) for field in (*_TSV_ARRAYS, "features")}
        feature_dim = _check_sizes(sizes, num_boxes, feature_dim, path, line) or feature_dim
        if row["img_id"] in line_of_id:
            first_line = line_of_id[row["img_id"]]
            raise InputError(f"line {line}: image id {row['img_id']!r} already on line {first_line}", path)
        line_of_id[row["img_id"]] = line
        num_rows += 1
        max_boxes = max(max_boxes, num_boxes)
    if num_rows == 0:
        raise InputError("no rows", path)
    if feature_dim is None:
        raise InputError("no row has any box, so the feature dimension is unknown", path)
    return _TsvSummary(num_rows=num_rows, max_boxes=max_boxes, feature_dim=feature_dim)


def _decode_base64(text: str, field: str, path: Path, line: int) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as err:  # binascii.Error, or non-ASCII text
        raise InputError(f"line {line}: {field} is not valid base64 ({err})", path) from None


def _read_tsv(path: Path, feature_dim: int) -> Iterator[RegionRecord]:
    """Second pass: decode every row into a record (one row in memory at a time)."""
    for line, fields in _tsv_rows(path):
        row = dict(zip(TSV_FIELDS, fields))
        num_boxes = _tsv_int(row["num_boxes"], "num_boxes", path, line)
        raw = {field: _decode_base64(row[field], field, path, line) for field in (*_TSV_ARRAYS, "features")}
        _check_sizes({field: len(data) for field, data in raw.items()}, num_boxes, feature_dim, path, line)
        arrays = {
            name: np.frombuffer(raw[field], dtype=dtype).reshape(num_boxes, *BOX_ARRAYS[name][0])
            for field, (name, dtype) in _TSV_ARRAYS.items()
        }
        features = np.frombuffer(raw["features"], dtype="<f4").reshape(num_boxes, feature_dim)
        yield RegionRecord(
            img_id=row["img_id"],
            img_h=_tsv_int(row["img_h"], "img_h", path, line),
            img_w=_tsv_int(row["img_w"], "img_w", path, line),
            features=features,
            **arrays,
        )


def import_tsv(
    tsv_path: str | Path,
    h5_path: str | Path,
    *,
    feature_dtype: str = "float32",
    max_boxes: int | None = None,
    provenance: dict[str, Any] | None = None,
) -> int:
    """Convert an LXMERT feature TSV into a feature file; return the number of images.

    Streams the TSV twice (count rows and the largest box count, then write), so memory does not grow
    with the file. `max_boxes` defaults to the largest box count in the file. With float32 (the
    default), `export_tsv` gives back the same bytes; float16 halves the file but rounds the features,
    so the exported TSV then differs in its features column.
    """
    tsv_path = Path(tsv_path)
    if not tsv_path.is_file():
        raise InputError("TSV file not found", tsv_path)
    summary = _scan_tsv(tsv_path)
    if max_boxes is not None and summary.max_boxes > max_boxes:
        raise InputError(f"an image has {summary.max_boxes} boxes, more than max_boxes={max_boxes}", tsv_path)
    full_provenance = {"source_format": "lxmert_tsv", "source_file": tsv_path.name, **(provenance or {})}
    writer = FeatureWriter(
        h5_path,
        num_images=summary.num_rows,
        max_boxes=max_boxes or summary.max_boxes,
        feature_dim=summary.feature_dim,
        feature_dtype=feature_dtype,
        provenance=full_provenance,
    )
    with writer:
        for row, record in enumerate(_read_tsv(tsv_path, summary.feature_dim)):
            writer.write(row, record)
    return summary.num_rows


def export_tsv(h5_path: str | Path, tsv_path: str | Path) -> int:
    """Write a feature file as an LXMERT TSV (features as float32); return the number of images.

    Uses LXMERT's writer dialect (csv.DictWriter, tab delimiter, "\\r\\n" line ends, no header).
    """
    reader = FeatureReader(h5_path)
    with reader, atomic_path(tsv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=TSV_FIELDS, delimiter="\t")
        for row in range(len(reader)):
            record = reader._record_at(row)
            fields: dict[str, Any] = {
                "img_id": record.img_id,
                "img_h": record.img_h,
                "img_w": record.img_w,
                "num_boxes": record.num_boxes,
                "features": _encode_base64(record.features, "<f4"),
            }
            for field, (name, dtype) in _TSV_ARRAYS.items():
                fields[field] = _encode_base64(getattr(record, name), dtype)
            writer.writerow(fields)
    return len(reader)


def _encode_base64(values: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes()).decode("ascii")
