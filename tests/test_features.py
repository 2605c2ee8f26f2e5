"""Tests of the HDF5 region-feature store and LXMERT TSV import/export, on real files."""

from __future__ import annotations

import base64
import contextlib
import csv
import json
import os
import pickle
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import semvlp
from semvlp.errors import InputError
from semvlp.features import (
    FeatureReader,
    FeatureWriter,
    RegionRecord,
    export_tsv,
    import_tsv,
    write_store_index,
)

MAX_BOXES = 6
FEATURE_DIM = 16
PROVENANCE = {
    "backend": "torchvision",
    "detector_weights_sha256": "ab" * 32,
    "selection": {"conf_threshold": 0.2, "min_boxes": 2, "max_boxes": MAX_BOXES},
    "classes": ["circle", "square"],
}
# LXMERT's column order, written out here rather than imported, so the tests check the module's list.
LXMERT_FIELDS = [
    "img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
    "num_boxes", "boxes", "features",
]


def random_record(
    rng: np.random.Generator, img_id: str, num_boxes: int, feature_dim: int = FEATURE_DIM
) -> RegionRecord:
    x1y1 = rng.uniform(0, 300, size=(num_boxes, 2))
    wh = rng.uniform(1, 200, size=(num_boxes, 2))
    return RegionRecord(
        img_id=img_id,
        img_h=int(rng.integers(100, 640)),
        img_w=int(rng.integers(100, 640)),
        boxes=np.concatenate([x1y1, x1y1 + wh], axis=1).astype(np.float32),
        features=rng.standard_normal((num_boxes, feature_dim)).astype(np.float32),
        obj_ids=rng.integers(0, 1600, size=num_boxes),
        obj_confs=rng.uniform(0.2, 1, size=num_boxes).astype(np.float32),
        attr_ids=rng.integers(0, 400, size=num_boxes),
        attr_confs=rng.uniform(0, 1, size=num_boxes).astype(np.float32),
    )


def write_store(path: Path, records: list[RegionRecord], feature_dtype: str = "float16", **provenance) -> None:
    with FeatureWriter(
        path,
        num_images=len(records),
        max_boxes=MAX_BOXES,
        feature_dim=FEATURE_DIM,
        feature_dtype=feature_dtype,
        provenance={**PROVENANCE, **provenance},
    ) as writer:
        for index, record in enumerate(records):
            writer.write(index, record)


def open_writer(path: Path, num_images: int) -> FeatureWriter:
    return FeatureWriter(
        path, num_images=num_images, max_boxes=MAX_BOXES, feature_dim=FEATURE_DIM, provenance=PROVENANCE
    )


def assert_same_record(actual: RegionRecord, expected: RegionRecord, feature_dtype: str) -> None:
    assert (actual.img_id, actual.img_h, actual.img_w) == (expected.img_id, expected.img_h, expected.img_w)
    assert actual.num_boxes == expected.num_boxes
    for name in ("boxes", "obj_ids", "obj_confs", "attr_ids", "attr_confs"):
        assert getattr(actual, name).dtype == getattr(expected, name).dtype, name
        np.testing.assert_array_equal(getattr(actual, name), getattr(expected, name), err_msg=name)
    assert actual.features.dtype == np.dtype(feature_dtype)
    np.testing.assert_array_equal(actual.features, expected.features.astype(feature_dtype))


@pytest.fixture
def records() -> list[RegionRecord]:
    rng = np.random.default_rng(0)
    # Full, partial, empty and single-box images: padding must be handled for each.
    return [random_record(rng, f"COCO_val2014_{i:012d}", n) for i, n in enumerate([MAX_BOXES, 3, 0, 1, 5])]


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]


# --------------------------------------------------------------------------------------------------
# HDF5 store


@pytest.mark.parametrize("feature_dtype", ["float16", "float32"])
def test_round_trip_reads_back_exact_records_with_zero_padding(tmp_path, records, feature_dtype):
    path = tmp_path / "coco.h5"
    write_store(path, records, feature_dtype)

    reader = FeatureReader(path)
    assert reader.ids == [r.img_id for r in records]
    assert (len(reader), reader.max_boxes, reader.feature_dim) == (len(records), MAX_BOXES, FEATURE_DIM)
    for record in records:
        assert_same_record(reader.get(record.img_id), record, feature_dtype)

        padded = reader.get_padded(record.img_id)
        n = record.num_boxes
        assert padded["features"].shape == (MAX_BOXES, FEATURE_DIM)
        assert padded["boxes"].shape == (MAX_BOXES, 4)
        assert int(padded["num_boxes"]) == n
        assert (int(padded["img_h"]), int(padded["img_w"])) == (record.img_h, record.img_w)
        np.testing.assert_array_equal(padded["boxes"][:n], record.boxes)
        for name in ("boxes", "features", "obj_ids", "obj_confs", "attr_ids", "attr_confs"):
            assert not padded[name][n:].any(), f"padding of {name} is not zero"

    # The on-disk layout other tools read.
    with h5py.File(path, "r") as h5:
        assert h5["img_ids"].asstr()[()].tolist() == reader.ids
        assert h5["num_boxes"][()].tolist() == [r.num_boxes for r in records]
        assert h5["features"].shape == (len(records), MAX_BOXES, FEATURE_DIM)
        assert h5["features"].dtype == np.dtype(feature_dtype)
        for name, dtype in [("boxes", np.float32), ("obj_ids", np.int64), ("obj_confs", np.float32),
                            ("attr_ids", np.int64), ("attr_confs", np.float32), ("img_h", np.int64)]:
            assert h5[name].dtype == dtype, name


def test_attributes_hold_provenance_and_writer_facts(tmp_path, records):
    path = tmp_path / "coco.h5"
    before = datetime.now(timezone.utc).replace(microsecond=0)
    write_store(path, records, flag=True, note=None, weights_bytes=np.int64(123))

    provenance = FeatureReader(path).provenance
    for key, value in PROVENANCE.items():
        assert provenance[key] == value, key  # nested dicts and lists come back decoded
    assert provenance["flag"] is True and provenance["note"] is None and provenance["weights_bytes"] == 123
    assert provenance["feature_dim"] == FEATURE_DIM
    assert provenance["feature_dtype"] == "float16"
    assert provenance["max_boxes"] == MAX_BOXES
    assert provenance["semvlp_version"] == semvlp.__version__
    created = datetime.fromisoformat(provenance["created_utc"])
    assert created.utcoffset().total_seconds() == 0
    assert before <= created <= datetime.now(timezone.utc)
    with h5py.File(path, "r") as h5:  # nested values are JSON strings in the file itself
        assert json.loads(h5.attrs["selection"]) == PROVENANCE["selection"]


def test_features_have_one_image_per_chunk_and_no_compression(tmp_path, records):
    path = tmp_path / "coco.h5"
    write_store(path, records)
    with h5py.File(path, "r") as h5:
        assert h5["features"].chunks == (1, MAX_BOXES, FEATURE_DIM)
        assert h5["features"].compression is None


def test_missing_rows_raise_and_leave_no_file(tmp_path, records):
    path = tmp_path / "coco.h5"
    with pytest.raises(RuntimeError, match=r"1 of 5 rows were never written \(first: \[2\]\)"):
        with open_writer(path, num_images=5) as w:
            for index in (0, 1, 3, 4):
                w.write(index, records[index])
    assert not path.exists()
    assert no_temp_files(tmp_path)


def test_exception_inside_with_leaves_no_file(tmp_path, records):
    path = tmp_path / "coco.h5"
    with pytest.raises(KeyboardInterrupt):
        with open_writer(path, num_images=5) as w:
            w.write(0, records[0])
            raise KeyboardInterrupt  # e.g. the job is killed halfway
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_records_that_do_not_fit(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "coco.h5"
    with pytest.raises(ValueError):
        with open_writer(path, num_images=2) as w:
            with pytest.raises(ValueError, match="7 boxes, more than max_boxes=6"):
                w.write(0, random_record(rng, "a", MAX_BOXES + 1))
            with pytest.raises(ValueError, match="feature dimension 8, expected 16"):
                w.write(0, random_record(rng, "a", 2, feature_dim=8))
            with pytest.raises(IndexError):
                w.write(2, random_record(rng, "a", 2))
            w.write(0, random_record(rng, "a", 2))
            with pytest.raises(ValueError, match="row 0 was already written"):
                w.write(0, random_record(rng, "b", 2))
            with pytest.raises(ValueError, match="'a' already written as row 0"):
                w.write(1, random_record(rng, "a", 2))
            overflowing = random_record(rng, "b", 2)
            overflowing.features[0, 0] = 1e6
            w.write(1, overflowing)  # float16 cannot hold 1e6: the last ValueError, ending the block
    assert not path.exists()


def test_writer_refuses_provenance_contradicting_its_settings(tmp_path):
    with pytest.raises(ValueError, match="'max_boxes'"):
        FeatureWriter(tmp_path / "x.h5", num_images=1, max_boxes=6, feature_dim=4, provenance={"max_boxes": 36})
    FeatureWriter(tmp_path / "x.h5", num_images=1, max_boxes=6, feature_dim=4, provenance={"max_boxes": 6})


def test_store_index_reads_shards_as_one_store_without_copying_features(tmp_path, records):
    shard_paths = [tmp_path / "coco" / f"shard{i}.h5" for i in range(8)]
    shard_paths[0].parent.mkdir()
    # an empty shard (more shards than images) is valid
    parts = [records[i : i + 1] for i in range(len(records))] + [[]] * (8 - len(records))
    for shard, (path, part) in enumerate(zip(shard_paths, parts)):
        write_store(path, part, shard=shard)
    out = tmp_path / "coco.h5"

    write_store_index(shard_paths, out)

    store = FeatureReader(out)
    assert store.ids == [r.img_id for r in records]
    assert len(store.shards) == 8
    for record in records:
        assert_same_record(store.get(record.img_id), record, "float16")
    assert "shard" not in store.provenance
    assert store.provenance["selection"] == PROVENANCE["selection"]
    # no feature is copied: the index holds the per-image arrays and pointers into the shards
    assert out.stat().st_size < sum(p.stat().st_size for p in shard_paths) / 2
    with h5py.File(out, "r") as h5:
        assert h5["features"].is_virtual
        np.testing.assert_array_equal(h5["features"][len(records) - 1], store.read_rows([len(records) - 1])["features"][0])
    # a batch across shards, in any order, with repeats
    rows = [3, 0, 3, 1]
    batch = store.read_rows(rows)
    for i, row in enumerate(rows):
        n = records[row].num_boxes
        np.testing.assert_array_equal(batch["features"][i, :n], records[row].features.astype(np.float16))
        assert not batch["features"][i, n:].any()
    # the folder moves as a whole: shard paths are relative to the index
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path, moved, ignore=shutil.ignore_patterns("moved"))
    assert FeatureReader(moved / "coco.h5").get(records[1].img_id).img_id == records[1].img_id


def test_store_with_a_missing_or_rewritten_shard_is_refused(tmp_path, records):
    paths = [tmp_path / "shard0.h5", tmp_path / "shard1.h5"]
    write_store(paths[0], records[:2], shard=0)
    write_store(paths[1], records[2:], shard=1)
    write_store_index(paths, tmp_path / "coco.h5")
    write_store(paths[1], records[2:3], shard=1)
    with pytest.raises(InputError, match=r"shard .*shard1.h5 has features of shape .*rerun the index"):
        FeatureReader(tmp_path / "coco.h5")
    paths[1].unlink()
    with pytest.raises(InputError, match=r"coco.h5: shard shard1.h5 of this store is missing"):
        FeatureReader(tmp_path / "coco.h5")


def test_store_index_refuses_shards_with_different_provenance(tmp_path, records):
    write_store(tmp_path / "shard0.h5", records[:2], shard=0)
    write_store(tmp_path / "shard1.h5", records[2:], shard=1, detector_weights_sha256="cd" * 32)
    with pytest.raises(InputError) as err:
        write_store_index([tmp_path / "shard0.h5", tmp_path / "shard1.h5"], tmp_path / "coco.h5")
    message = str(err.value)
    assert "shard1.h5" in message and "'detector_weights_sha256'" in message and "cd" * 32 in message
    assert not (tmp_path / "coco.h5").exists()

    write_store(tmp_path / "shard2.h5", records[2:], shard=2, feature_dtype="float32")
    with pytest.raises(InputError, match="shard2.h5: provenance 'feature_dtype'"):
        write_store_index([tmp_path / "shard0.h5", tmp_path / "shard2.h5"], tmp_path / "coco.h5")


def test_store_index_refuses_duplicate_image_ids(tmp_path, records):
    write_store(tmp_path / "shard0.h5", records[:3], shard=0)
    write_store(tmp_path / "shard1.h5", records[2:], shard=1)
    with pytest.raises(InputError, match=rf"shard1.h5: image id '{records[2].img_id}' is also in shard .*shard0.h5"):
        write_store_index([tmp_path / "shard0.h5", tmp_path / "shard1.h5"], tmp_path / "coco.h5")
    assert not (tmp_path / "coco.h5").exists()


@pytest.mark.parametrize("order", ["in_order", "reversed"])
def test_raw_reads_equal_hdf5_reads(tmp_path, records, order):
    """Rows written in reverse put the one-image chunks out of row order: the reader reads each chunk."""
    path = tmp_path / "coco.h5"
    rows = list(enumerate(records))
    with FeatureWriter(path, num_images=len(records), max_boxes=MAX_BOXES, feature_dim=FEATURE_DIM, provenance=PROVENANCE) as writer:
        for index, record in rows if order == "in_order" else reversed(rows):
            writer.write(index, record)
    reader = FeatureReader(path)
    wanted = [2, 0, 2, 1]
    batch = reader.read_rows(wanted)
    with h5py.File(path, "r") as h5:
        for name, values in batch.items():
            np.testing.assert_array_equal(values, h5[name][()][wanted])


def test_reader_looks_up_ids_and_names_unknown_ones(tmp_path, records):
    path = tmp_path / "coco.h5"
    write_store(path, records)
    reader = FeatureReader(path)
    for row, record in enumerate(records):
        assert record.img_id in reader
        assert reader.index(record.img_id) == row
    assert "COCO_val2014_999" not in reader
    with pytest.raises(InputError, match=r"coco.h5: image id 'COCO_val2014_999' is not in this feature file \(5 images\)"):
        reader.get("COCO_val2014_999")


def open_hdf5_files() -> int:
    return h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE)


def test_reader_opens_lazily_closes_and_pickles_without_handle(tmp_path, records):
    path = tmp_path / "coco.h5"
    write_store(path, records)
    baseline = open_hdf5_files()

    reader = FeatureReader(path)
    assert open_hdf5_files() == baseline  # the constructor read what it needs and closed the file
    reader.get(records[0].img_id)
    assert open_hdf5_files() == baseline + 1

    restored = pickle.loads(pickle.dumps(reader))  # with its handle open
    assert open_hdf5_files() == baseline + 1
    assert_same_record(restored.get(records[1].img_id), records[1], "float16")
    assert open_hdf5_files() == baseline + 2

    reader.close()
    restored.close()
    assert open_hdf5_files() == baseline
    assert_same_record(reader.get(records[3].img_id), records[3], "float16")  # reopens on demand
    reader.close()


class PaddedRegions(torch.utils.data.Dataset):
    """A minimal dataset over a feature file, as the training code builds one."""

    def __init__(self, reader: FeatureReader):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        item = self.reader.get_padded(self.reader.ids[index])
        item["worker_pid"] = np.asarray(os.getpid())
        item["file_offsets"] = np.asarray([file_offset(fd) for fd in descriptors_of(self.reader.path)])
        return item


def descriptors_of(path: Path) -> list[int]:
    """This process's open file descriptors on `path` (Linux /proc)."""
    fds = []
    for entry in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # the descriptor listing the folder itself is gone by now
            if Path(os.readlink(entry)) == path.resolve():
                fds.append(int(entry.name))
    return fds


def file_offset(fd: int) -> int:
    """The offset of the open file description behind `fd`, which a forked child shares with its parent."""
    fdinfo = Path(f"/proc/self/fdinfo/{fd}").read_text()
    return int(fdinfo.split("pos:")[1].split()[0])


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method and /proc")
def test_reader_works_in_forked_dataloader_workers(tmp_path, records):
    path = tmp_path / "coco.h5"
    write_store(path, records)
    reader = FeatureReader(path)
    reader.get(records[0].img_id)  # the parent's handle is open when the workers fork
    # Mark the parent's open file descriptions (HDF5's, and the memory map's own): reads use pread or
    # the mapping, so the offset is otherwise untouched (0), and a worker still using an inherited
    # description would see the mark.
    parent_fds = descriptors_of(path)
    assert parent_fds
    for fd in parent_fds:
        os.lseek(fd, 987654, os.SEEK_SET)

    loader = torch.utils.data.DataLoader(
        PaddedRegions(reader), batch_size=2, num_workers=2, multiprocessing_context="fork"
    )
    batches = list(loader)

    features = torch.cat([batch["features"] for batch in batches])  # (N, K, D)
    num_boxes = torch.cat([batch["num_boxes"] for batch in batches])  # (N,)
    assert features.shape == (len(records), MAX_BOXES, FEATURE_DIM)
    for row, record in enumerate(records):
        assert int(num_boxes[row]) == record.num_boxes
        np.testing.assert_array_equal(features[row, : record.num_boxes].numpy(), record.features.astype(np.float16))
    worker_pids = set(torch.cat([batch["worker_pid"] for batch in batches]).tolist())
    assert os.getpid() not in worker_pids and len(worker_pids) == 2
    # Each worker read through descriptors of its own (HDF5's at 0, the mapping's where numpy left it, at
    # the end): the inherited ones, with the mark, were closed, not shared.
    worker_offsets = torch.cat([batch["file_offsets"] for batch in batches])  # (N, descriptors)
    assert worker_offsets.shape == (len(records), len(parent_fds))
    assert set(worker_offsets.flatten().tolist()) <= {0, path.stat().st_size}
    assert all(file_offset(fd) == 987654 for fd in parent_fds)
    assert_same_record(reader.get(records[4].img_id), records[4], "float16")  # the parent's handle still works
    reader.close()


def test_reader_refuses_provenance_the_config_does_not_expect(tmp_path, records):
    path = tmp_path / "coco.h5"
    write_store(path, records)
    FeatureReader(path, expect={"backend": "torchvision", "feature_dim": FEATURE_DIM, "classes": ("circle", "square")})

    with pytest.raises(InputError) as err:
        FeatureReader(path, expect={"backend": "torchvision", "selection": {**PROVENANCE["selection"], "max_boxes": 36}})
    message = str(err.value)
    assert str(path) in message and "'selection'" in message
    assert "'max_boxes': 6" in message and "'max_boxes': 36" in message  # the file's value and the expected one

    with pytest.raises(InputError, match="provenance 'detector_config_sha256' is absent"):
        FeatureReader(path, expect={"detector_config_sha256": "00"})


def test_reader_refuses_files_that_are_not_feature_stores(tmp_path):
    with pytest.raises(InputError, match="missing.h5: feature file not found"):
        FeatureReader(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(InputError, match="text.h5: cannot open as HDF5"):
        FeatureReader(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5["features"] = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(InputError, match="other.h5: not a region-feature file: missing datasets"):
        FeatureReader(tmp_path / "other.h5")


# --------------------------------------------------------------------------------------------------
# LXMERT TSV


def b64(values: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.asarray(values, dtype=dtype).tobytes()).decode("ascii")


def write_lxmert_tsv(path: Path, records: list[RegionRecord]) -> None:
    """Write a feature TSV the way LXMERT's extraction script does (csv.DictWriter, default dialect)."""
    with open(path, "w") as f:
        writer = csv.DictWriter(f, delimiter="\t", fieldnames=LXMERT_FIELDS)
        for r in records:
            writer.writerow({
                "img_id": r.img_id, "img_h": r.img_h, "img_w": r.img_w,
                "objects_id": b64(r.obj_ids, "int64"), "objects_conf": b64(r.obj_confs, "float32"),
                "attrs_id": b64(r.attr_ids, "int64"), "attrs_conf": b64(r.attr_confs, "float32"),
                "num_boxes": r.num_boxes, "boxes": b64(r.boxes, "float32"), "features": b64(r.features, "float32"),
            })


@pytest.fixture
def lxmert_tsv(tmp_path, records) -> Path:
    path = tmp_path / "val2014_obj36.tsv"
    write_lxmert_tsv(path, records)
    return path


def test_tsv_to_hdf5_to_tsv_is_byte_identical(tmp_path, records, lxmert_tsv):
    h5_path = tmp_path / "coco.h5"
    assert import_tsv(lxmert_tsv, h5_path, provenance={"detector": "bottom-up-attention"}) == len(records)

    reader = FeatureReader(h5_path)
    assert reader.max_boxes == max(r.num_boxes for r in records) and reader.feature_dtype == "float32"
    for record in records:
        assert_same_record(reader.get(record.img_id), record, "float32")
    assert reader.provenance["source_format"] == "lxmert_tsv"
    assert reader.provenance["source_file"] == lxmert_tsv.name
    assert reader.provenance["detector"] == "bottom-up-attention"

    exported = tmp_path / "exported.tsv"
    assert export_tsv(h5_path, exported) == len(records)
    assert exported.read_bytes() == lxmert_tsv.read_bytes()


def test_tsv_import_into_more_boxes_or_float16(tmp_path, records, lxmert_tsv):
    wide = tmp_path / "wide.h5"
    import_tsv(lxmert_tsv, wide, max_boxes=10)
    assert FeatureReader(wide).max_boxes == 10
    export_tsv(wide, tmp_path / "wide.tsv")
    assert (tmp_path / "wide.tsv").read_bytes() == lxmert_tsv.read_bytes()

    with pytest.raises(InputError, match="more than max_boxes=4"):
        import_tsv(lxmert_tsv, tmp_path / "narrow.h5", max_boxes=4)
    assert not (tmp_path / "narrow.h5").exists()

    # float16 rounds the features only: every other column still comes back byte for byte.
    half = tmp_path / "half.h5"
    import_tsv(lxmert_tsv, half, feature_dtype="float16")
    export_tsv(half, tmp_path / "half.tsv")
    with open(lxmert_tsv, newline="") as a, open(tmp_path / "half.tsv", newline="") as b:
        for original, exported in zip(csv.reader(a, delimiter="\t"), csv.reader(b, delimiter="\t"), strict=True):
            assert original[:9] == exported[:9]
            features = np.frombuffer(base64.b64decode(original[9]), np.float32)
            rounded = np.frombuffer(base64.b64decode(exported[9]), np.float32)
            np.testing.assert_array_equal(rounded, features.astype(np.float16).astype(np.float32))


def corrupt_line_2(path: Path, change) -> None:
    """Apply `change` to the fields (a dict) of the TSV's second line."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    fields = dict(zip(LXMERT_FIELDS, rows[1]))
    change(fields)
    rows[1] = list(fields.values())
    with open(path, "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows(rows)


def truncate_features(fields):
    fields["features"] = fields["features"][:-8]


def drop_a_box_from_objects(fields):
    fields["objects_id"] = b64(np.frombuffer(base64.b64decode(fields["objects_id"]), np.int64)[:-1], "int64")


def change_feature_dim(fields):
    features = np.frombuffer(base64.b64decode(fields["features"]), np.float32)
    fields["features"] = b64(features.reshape(3, FEATURE_DIM)[:, :8], "float32")


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda f: f.pop("attrs_conf"), "line 2: 9 tab-separated fields, expected 10"),
        (lambda f: f.update(features=f["features"][:-1]), "line 2: features is not valid base64"),
        (truncate_features, "line 2: features hold 186 bytes, expected 192 (4 x num_boxes=3 x feature_dim=16"),
        (drop_a_box_from_objects, "line 2: objects_id holds 16 bytes, expected 24 for num_boxes=3"),
        (lambda f: f.update(num_boxes="4"), "line 2: objects_id holds 24 bytes, expected 32 for num_boxes=4"),
        (lambda f: f.update(num_boxes="three"), "line 2: num_boxes is 'three', not an integer"),
        (change_feature_dim, "line 2: features hold 96 bytes, expected 192"),
    ],
)
def test_malformed_tsv_lines_are_reported_with_file_and_line(tmp_path, lxmert_tsv, change, problem):
    corrupt_line_2(lxmert_tsv, change)
    with pytest.raises(InputError) as err:
        import_tsv(lxmert_tsv, tmp_path / "coco.h5")
    assert str(err.value).startswith(f"{lxmert_tsv}: {problem}")
    assert not (tmp_path / "coco.h5").exists()
    assert no_temp_files(tmp_path)


def test_tsv_bad_base64_characters_found_in_second_pass(tmp_path, lxmert_tsv):
    # Right length but an invalid character: only decoding (the second pass) sees it.
    corrupt_line_2(lxmert_tsv, lambda f: f.update(boxes="*" + f["boxes"][1:]))
    with pytest.raises(InputError, match=r"val2014_obj36.tsv: line 2: boxes is not valid base64"):
        import_tsv(lxmert_tsv, tmp_path / "coco.h5")
    assert not (tmp_path / "coco.h5").exists()
    assert no_temp_files(tmp_path)


def test_tsv_duplicate_image_id_is_reported(tmp_path, records):
    path = tmp_path / "dup.tsv"
    write_lxmert_tsv(path, [records[0], records[1], records[0]])
    with pytest.raises(InputError, match=rf"dup.tsv: line 3: image id '{records[0].img_id}' already on line 1"):
        import_tsv(path, tmp_path / "coco.h5")
