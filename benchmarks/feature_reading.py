"""Benchmark: random-access reading of region features, our HDF5 store against LXMERT's TSV loading.

LXMERT reads the whole feature TSV into a list of dicts with decoded numpy arrays, then indexes it by
image id; every DataLoader batch copies its images out of that in-memory table. Our reader opens the
HDF5 file lazily and reads one chunk per image. For each reader this measures, in a fresh subprocess
(so that its peak RSS is its own):

* time to first batch: from constructing the reader to holding the first batch of 32 random images,
* throughput: images/s over the following batches of 32 random ids (with replacement),
* peak RSS of the process (resource.getrusage, ru_maxrss).

Both readers build the same batch: features (32, K, D) float32 and boxes (32, K, 4) float32.

Data: N images x 36 boxes x 2048-d float32 random features, written once as an LXMERT TSV (with
csv.DictWriter, as LXMERT's extraction does) and converted with `semvlp.features.import_tsv` (float32)
into a cache folder outside the repository (default /tmp/semvlp-bench). The conversion's time and peak
RSS are reported too. With `--page-cache cold` (default) both files are dropped from the OS page cache
(fsync + posix_fadvise DONTNEED, no root needed) before each reader runs; `warm` reads them once first.

    python benchmarks/feature_reading.py --images 1000
    python benchmarks/feature_reading.py --images 20000      # ~6 GB of features, ~8 GB of TSV
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BATCH_SIZE = 32
NUM_BOXES = 36
FEATURE_DIM = 2048
LXMERT_FIELDS = [
    "img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
    "num_boxes", "boxes", "features",
]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --------------------------------------------------------------------------------------------------
# Data generation (parent, once per cache folder)


def write_lxmert_tsv(path: Path, num_images: int, seed: int) -> None:
    """Random detections written the way LXMERT's extraction writes its TSV."""
    rng = np.random.default_rng(seed)

    def b64(values: np.ndarray) -> str:
        return base64.b64encode(values.tobytes()).decode("ascii")

    with open(path, "w") as f:
        writer = csv.DictWriter(f, delimiter="\t", fieldnames=LXMERT_FIELDS)
        for i in range(num_images):
            x1y1 = rng.uniform(0, 400, size=(NUM_BOXES, 2))
            boxes = np.concatenate([x1y1, x1y1 + rng.uniform(1, 200, size=(NUM_BOXES, 2))], axis=1)
            writer.writerow({
                "img_id": f"COCO_train2014_{i:012d}",
                "img_h": 480,
                "img_w": 640,
                "objects_id": b64(rng.integers(0, 1600, NUM_BOXES, dtype=np.int64)),
                "objects_conf": b64(rng.uniform(0.2, 1, NUM_BOXES).astype(np.float32)),
                "attrs_id": b64(rng.integers(0, 400, NUM_BOXES, dtype=np.int64)),
                "attrs_conf": b64(rng.uniform(0, 1, NUM_BOXES).astype(np.float32)),
                "num_boxes": NUM_BOXES,
                "boxes": b64(boxes.astype(np.float32)),
                "features": b64(rng.random((NUM_BOXES, FEATURE_DIM), dtype=np.float32)),  # post-ReLU-like
            })


def prepare(folder: Path, num_images: int, seed: int) -> dict:
    """Create (or reuse) the TSV and the HDF5 file; return the facts about them."""
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        return json.loads(meta_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    tsv, h5 = folder / "features.tsv", folder / "features.h5"
    print(f"generating {num_images} images into {tsv} ...", flush=True)
    start = time.perf_counter()
    write_lxmert_tsv(tsv, num_images, seed)
    generate_s = time.perf_counter() - start
    print(f"  {generate_s:.1f} s; converting to {h5} with semvlp.features.import_tsv ...", flush=True)
    conversion = run_child(["import", str(tsv), str(h5)])
    meta = {
        "images": num_images,
        "seed": seed,
        "tsv_bytes": tsv.stat().st_size,
        "h5_bytes": h5.stat().st_size,
        "generate_s": generate_s,
        "import_s": conversion["seconds"],
        "import_peak_rss_mb": conversion["peak_rss_mb"],
    }
    meta_path.write_text(json.dumps(meta, indent=1))  # written last: marks the folder complete
    return meta


def set_page_cache(paths: list[Path], mode: str) -> None:
    for path in paths:
        with open(path, "rb") as f:
            if mode == "cold":
                os.fsync(f.fileno())  # dirty pages cannot be dropped
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while f.read(1 << 24):
                    pass


# --------------------------------------------------------------------------------------------------
# Measurement (child processes)


def load_lxmert_style(tsv_path: Path) -> dict[str, dict]:
    """LXMERT's approach: decode every row into a dict of numpy arrays, then index the list by id."""
    csv.field_size_limit(sys.maxsize)
    rows = []
    with open(tsv_path) as f:
        for item in csv.DictReader(f, LXMERT_FIELDS, delimiter="\t"):
            for key in ("img_h", "img_w", "num_boxes"):
                item[key] = int(item[key])
            n = item["num_boxes"]
            decoded = {
                "objects_id": ((n,), np.int64), "objects_conf": ((n,), np.float32),
                "attrs_id": ((n,), np.int64), "attrs_conf": ((n,), np.float32),
                "boxes": ((n, 4), np.float32), "features": ((n, -1), np.float32),
            }
            for key, (shape, dtype) in decoded.items():
                item[key] = np.frombuffer(base64.b64decode(item[key]), dtype=dtype).reshape(shape)
            rows.append(item)
    return {item["img_id"]: item for item in rows}


def measure(reader_kind: str, path: Path, batches: int, seed: int) -> dict:
    start = time.perf_counter()
    if reader_kind == "hdf5":
        from semvlp.features import FeatureReader

        reader = FeatureReader(path)
        ids = reader.ids

        def load(img_id: str) -> tuple[np.ndarray, np.ndarray]:
            item = reader.get_padded(img_id)
            return item["features"], item["boxes"]
    else:
        table = load_lxmert_style(path)
        ids = list(table)

        def load(img_id: str) -> tuple[np.ndarray, np.ndarray]:
            item = table[img_id]
            return item["features"].copy(), item["boxes"].copy()  # as LXMERT's __getitem__ does

    rng = np.random.default_rng(seed)

    def batch() -> tuple[np.ndarray, np.ndarray]:
        items = [load(ids[i]) for i in rng.integers(0, len(ids), BATCH_SIZE)]
        features = np.stack([f for f, _ in items])  # (32, K, D) float32
        boxes = np.stack([b for _, b in items])  # (32, K, 4) float32
        return features, boxes

    features, _ = batch()
    first_batch_s = time.perf_counter() - start
    assert features.shape == (BATCH_SIZE, NUM_BOXES, FEATURE_DIM) and features.dtype == np.float32
    start = time.perf_counter()
    for _ in range(batches):
        batch()
    images_per_s = batches * BATCH_SIZE / (time.perf_counter() - start)
    return {"first_batch_s": first_batch_s, "images_per_s": images_per_s, "peak_rss_mb": peak_rss_mb()}


def child_main(argv: list[str]) -> None:
    if argv[0] == "import":
        from semvlp.features import import_tsv

        start = time.perf_counter()
        import_tsv(argv[1], argv[2], feature_dtype="float32", provenance={"benchmark": "feature_reading"})
        result = {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}
    else:
        result = measure(argv[0], Path(argv[1]), batches=int(argv[2]), seed=int(argv[3]))
    print(json.dumps(result))


def run_child(argv: list[str]) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", *argv], check=True, stdout=subprocess.PIPE, text=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=100, help="timed batches of 32 after the first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/semvlp-bench"))
    parser.add_argument("--page-cache", choices=["cold", "warm"], default="cold")
    args = parser.parse_args()

    folder = args.cache_dir / f"images{args.images}_boxes{NUM_BOXES}_dim{FEATURE_DIM}_seed{args.seed}"
    meta = prepare(folder, args.images, args.seed)
    tsv, h5 = folder / "features.tsv", folder / "features.h5"

    results = {}
    for kind, path in [("hdf5", h5), ("lxmert", tsv)]:
        set_page_cache([tsv, h5], args.page_cache)
        results[kind] = run_child([kind, str(path), str(args.batches), str(args.seed)])

    ours, theirs = results["hdf5"], results["lxmert"]
    print()
    print(f"{args.images} images x {NUM_BOXES} boxes x {FEATURE_DIM}-d float32; batches of {BATCH_SIZE} random ids; "
          f"page cache {args.page_cache}; {os.cpu_count()} CPUs")
    print(f"files: TSV {meta['tsv_bytes'] / 1e9:.2f} GB, HDF5 {meta['h5_bytes'] / 1e9:.2f} GB in {folder}; "
          f"import_tsv took {meta['import_s']:.1f} s at {meta['import_peak_rss_mb']:.0f} MB peak RSS")
    print()
    print("| reader | first batch (s) | images/s | peak RSS (MB) |")
    print("|---|---:|---:|---:|")
    print(f"| semvlp HDF5 | {ours['first_batch_s']:.3f} | {ours['images_per_s']:.0f} | {ours['peak_rss_mb']:.0f} |")
    print(f"| LXMERT-style TSV | {theirs['first_batch_s']:.3f} | {theirs['images_per_s']:.0f} | {theirs['peak_rss_mb']:.0f} |")
    print(f"| ratio ours / LXMERT | {ours['first_batch_s'] / theirs['first_batch_s']:.4f} | "
          f"{ours['images_per_s'] / theirs['images_per_s']:.2f} | {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.3f} |")
    print()
    command = [
        "python", "benchmarks/feature_reading.py", "--images", str(args.images), "--batches", str(args.batches),
        "--seed", str(args.seed), "--cache-dir", str(args.cache_dir), "--page-cache", args.page_cache,
    ]
    print("reproduce: " + shlex.join(command))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
    else:
        main()
