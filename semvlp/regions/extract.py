"""Region extraction for an image set: backend registry, common extractor, sharded feature files.

    extractor = build_extractor({"backend": "torchvision", "weights": "results/detector/tiny.pt"})
    record = extractor.extract(Image.open(path), img_id=path.stem)      # -> RegionRecord
    stats = extract_image_set(list_images(images_dir), "results/features/coco.h5", cfg)

`extract_image_set` writes one `semvlp.features` HDF5 file per shard; `semvlp.features.write_store_index`
joins them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from PIL import Image
from tqdm import tqdm

from semvlp.errors import InputError
from semvlp.features import FeatureWriter, RegionRecord
from semvlp.io import write_text
from semvlp.regions.detectron2_backend import build_detectron2_backend
from semvlp.regions.selection import DetectedRegions
from semvlp.regions.torchvision_backend import build_torchvision_backend

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class Backend(Protocol):
    """What a backend module provides (see torchvision_backend / detectron2_backend)."""

    selection: Any  # SelectionConfig

    @property
    def feature_dim(self) -> int: ...

    def provenance(self) -> dict[str, Any]: ...

    def extract_regions(self, image: Image.Image) -> DetectedRegions: ...


BACKENDS: dict[str, Callable[[dict[str, Any]], Backend]] = {
    "torchvision": build_torchvision_backend,
    "detectron2": build_detectron2_backend,
}


class RegionExtractor:
    """The interface every backend is used through: feature_dim, provenance(), extract(image)."""

    def __init__(self, backend: Backend):
        self.backend = backend

    @property
    def feature_dim(self) -> int:
        return self.backend.feature_dim

    @property
    def max_boxes(self) -> int:
        return self.backend.selection.max_boxes

    def provenance(self) -> dict[str, Any]:
        """Backend, config and weights files with their digests, selection settings, class counts."""
        return self.backend.provenance()

    def extract(self, image: Image.Image, img_id: str = "") -> RegionRecord:
        """The selected regions of one image, boxes in its own pixels."""
        regions = self.backend.extract_regions(image)
        return RegionRecord(
            img_id=img_id,
            img_h=image.height,
            img_w=image.width,
            boxes=regions.boxes.detach().float().cpu().numpy(),  # (n, 4)
            features=regions.features.detach().float().cpu().numpy(),  # (n, D)
            obj_ids=regions.obj_ids.detach().cpu().numpy(),
            obj_confs=regions.obj_confs.detach().float().cpu().numpy(),
            attr_ids=regions.attr_ids.detach().cpu().numpy(),
            attr_confs=regions.attr_confs.detach().float().cpu().numpy(),
        )


def build_extractor(cfg: dict[str, Any]) -> RegionExtractor:
    """An extractor from a config dict whose "backend" names an entry of BACKENDS."""
    name = cfg.get("backend")
    if name not in BACKENDS:
        raise ValueError(f"extractor config needs 'backend' in {sorted(BACKENDS)}, got {name!r}")
    return RegionExtractor(BACKENDS[name](cfg))


def list_images(images_dir: str | Path) -> list[Path]:
    """Image files (jpg/jpeg/png, any case) under `images_dir`, recursively, sorted by path."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise InputError("image folder not found", images_dir)
    return sorted(p for p in images_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image(path: Path) -> Image.Image:
    """Fully decode an image file as RGB; InputError naming the file when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() forces the full decode inside the try
    except FileNotFoundError:
        raise InputError("image file not found", path) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"cannot decode image ({err})", path) from None


def shard_of(image_paths: list[Path], shard: int, num_shards: int) -> list[Path]:
    """Shard k of n: the images at positions i of the sorted list with i % n == k."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"need 0 <= shard < num_shards, got shard={shard}, num_shards={num_shards}")
    return sorted(Path(p) for p in image_paths)[shard::num_shards]


def extract_image_set(
    image_paths: list[Path],
    out_path: str | Path,
    extractor_cfg: dict[str, Any],
    *,
    shard: int = 0,
    num_shards: int = 1,
    skip_bad_images: bool = False,
    feature_dtype: str = "float16",
) -> dict[str, Any]:
    """Extract regions of one shard of an image set into one feature file (written atomically).

    img_id is the file stem. Bad images (missing, undecodable) fail with an InputError naming the file,
    or with `skip_bad_images` are listed in `<out_path>.skipped.txt` and left out. Returns statistics.
    """
    out_path = Path(out_path)
    if not image_paths:
        raise InputError("the image list is empty: no images to extract features for", out_path)
    _check_unique_ids(image_paths)  # over the whole set, so that the shards merge
    paths = shard_of(image_paths, shard, num_shards)

    # Build the detector first: a wrong weights/config path should fail before any image work.
    extractor = build_extractor(extractor_cfg)

    # Every image is decoded once up front because the writer needs the final row count; decoding is
    # cheap next to detection. The image is decoded again when its turn comes.
    good: list[Path] = []
    bad: list[tuple[Path, str]] = []
    for path in paths:
        try:
            load_image(path)
            good.append(path)
        except InputError as err:
            if not skip_bad_images:
                raise
            bad.append((path, err.problem))
    skipped_path = out_path.with_name(out_path.name + ".skipped.txt")
    if skip_bad_images:
        write_text(skipped_path, "".join(f"{path}\t{problem}\n" for path, problem in bad))
        if bad:
            log.warning("%s: skipped %d undecodable image(s), listed in %s", out_path, len(bad), skipped_path)

    provenance = {
        **extractor.provenance(),
        "shard": shard,
        "num_shards": num_shards,
        "num_skipped_images": len(bad),
    }
    started = time.perf_counter()
    total_boxes = 0
    with FeatureWriter(
        out_path,
        num_images=len(good),
        max_boxes=extractor.max_boxes,
        feature_dim=extractor.feature_dim,
        feature_dtype=feature_dtype,
        provenance=provenance,
    ) as writer:
        for row, path in enumerate(tqdm(good, desc=f"regions {out_path.name}", unit="img", mininterval=5.0)):
            record = extractor.extract(load_image(path), img_id=path.stem)
            writer.write(row, record)
            total_boxes += record.num_boxes
    seconds = time.perf_counter() - started
    return {
        "images": len(good),
        "skipped": len(bad),
        "skipped_list": str(skipped_path) if skip_bad_images else None,
        "shard": shard,
        "num_shards": num_shards,
        "mean_boxes": total_boxes / len(good) if good else 0.0,
        "seconds": round(seconds, 3),
        "images_per_second": round(len(good) / seconds, 3) if seconds > 0 else None,
    }


def _check_unique_ids(paths: list[Path]) -> None:
    seen: dict[str, Path] = {}
    for path in sorted(Path(p) for p in paths):
        if path.stem in seen:
            raise InputError(f"image id {path.stem!r} is also the id of {seen[path.stem]}", path)
        seen[path.stem] = path
