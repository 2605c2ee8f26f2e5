"""Region extraction for an image set: backend registry, common extractor, sharded feature files.

    extractor = build_extractor({"backend": "torchvision", "weights": "results/detector/tiny.pt"})
    record = extractor.extract(load_image(path), img_id=path.stem)      # -> RegionRecord
    records = extractor.extract_batch(images, img_ids)                 # one forward pass
    stats = extract_image_set(list_images(images_dir), "results/features/coco.h5", cfg, batch_size=8)

`extract_image_set` writes one `semvlp.features` HDF5 file per shard, decoding images in DataLoader
workers while the detector runs; `semvlp.features.write_store_index` joins them. Images are decoded
with their EXIF orientation applied (phone photos are often stored rotated).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from semvlp.data.layout import IMAGE_SUFFIXES
from semvlp.errors import InputError
from semvlp.features import FeatureWriter, RegionRecord
from semvlp.io import write_text
from semvlp.regions import detectron2_backend, torchvision_backend
from semvlp.regions.selection import DetectedRegions

log = logging.getLogger(__name__)



class Backend(Protocol):
    """What a backend module provides (see torchvision_backend / detectron2_backend)."""

    selection: Any  # SelectionConfig

    @property
    def feature_dim(self) -> int: ...

    def provenance(self) -> dict[str, Any]: ...

    def padded_size(self, width: int, height: int) -> tuple[int, int]: ...

    def extract_batch(self, images: list[Image.Image]) -> list[DetectedRegions]: ...


BACKENDS: dict[str, Callable[[dict[str, Any]], Backend]] = {
    "torchvision": torchvision_backend.build_torchvision_backend,
    "detectron2": detectron2_backend.build_detectron2_backend,
}
# The extractor settings each backend reads, known without importing detectron2.
BACKEND_SETTINGS: dict[str, frozenset[str]] = {
    "torchvision": torchvision_backend.SETTINGS,
    "detectron2": detectron2_backend.SETTINGS,
}
# Keys of a backend's config section that are not extraction settings: the detector trained here
# reads them (a checkpoint knows its own representation size).
TRAINING_SETTINGS: dict[str, tuple[str, ...]] = {"torchvision": ("representation_size",)}


def extractor_settings(regions: dict[str, Any], detector_weights: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """The extractor settings of a `semvlp.config.extraction_config`: the backend's section (less its training
    settings), the box selection, the device, and the detector trained here when the section names
    no weights."""
    backend = regions["backend"]
    section = {k: v for k, v in regions.get(backend, {}).items() if k not in TRAINING_SETTINGS.get(backend, ())}
    settings = {"backend": backend, **section, "selection": regions["selection"], "device": device}
    if backend == "torchvision" and settings.get("weights") is None:
        settings["weights"] = detector_weights
    return settings


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
        return self.extract_batch([image], [img_id])[0]

    def padded_size(self, width: int, height: int) -> tuple[int, int]:
        """The network input size of a width x height image: only images of one padded size give in a
        batch exactly what they give alone (a batch pads every image to its largest)."""
        return self.backend.padded_size(width, height)

    def extract_batch(self, images: list[Image.Image], img_ids: list[str]) -> list[RegionRecord]:
        """The selected regions of each image, from one forward pass over the batch. Images of different
        padded sizes get other boxes than alone (`extract_image_set` batches by padded size)."""
        return [
            RegionRecord(
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
            for image, img_id, regions in zip(images, img_ids, self.backend.extract_batch(images))
        ]


def build_extractor(cfg: dict[str, Any]) -> RegionExtractor:
    """An extractor from a config dict whose "backend" names an entry of BACKENDS."""
    name = cfg.get("backend")
    if name not in BACKENDS:
        raise ValueError(f"extractor config needs 'backend' in {sorted(BACKENDS)}, got {name!r}")
    return RegionExtractor(BACKENDS[name](cfg))


def list_images(*images_dirs: str | Path) -> list[Path]:
    """Image files (jpg/jpeg/png, any case) under each folder, recursively, sorted by path. An image
    whose stem an earlier folder already has is the same picture (GQA's imageId is Visual Genome's
    image_id, so one store serves both sets) and is left out."""
    images: list[Path] = []
    stems: set[str] = set()
    for images_dir in map(Path, images_dirs):
        if not images_dir.is_dir():
            raise InputError("image folder not found", images_dir)
        found = sorted(p for p in images_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        images += [p for p in found if p.stem not in stems]
        stems.update(p.stem for p in found)
    return images


def load_image(path: Path) -> Image.Image:
    """Fully decode an image file as RGB, upright (its EXIF orientation applied); InputError naming
    the file when it cannot be decoded."""
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")  # convert() forces the full decode inside the try
    except FileNotFoundError:
        raise InputError("image file not found", path) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"cannot decode image ({err})", path) from None


def shard_of(image_paths: list[Path], shard: int, num_shards: int) -> list[Path]:
    """Shard k of n: the images at positions i of the sorted list with i % n == k."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"need 0 <= shard < num_shards, got shard={shard}, num_shards={num_shards}")
    return sorted(Path(p) for p in image_paths)[shard::num_shards]


class _DecodedImages(torch.utils.data.Dataset):
    """Item i: (i, the decoded image or None, the decoding problem or None); run in DataLoader workers.
    With `sizes_only` the image is decoded but only its (width, height) is returned (the first pass,
    which finds bad images and plans the batches)."""

    def __init__(self, paths: list[Path], sizes_only: bool = False):
        self.paths, self.sizes_only = paths, sizes_only

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Image.Image | tuple[int, int] | None, str | None]:
        try:
            image = load_image(self.paths[index])
        except InputError as err:
            return index, None, err.problem
        return index, image.size if self.sizes_only else image, None


def _decoded(paths: list[Path], batches: list[list[int]], num_workers: int, sizes_only: bool = False):
    """Each batch of `batches` (positions in `paths`) as a list of `_DecodedImages` items, decoded by
    `num_workers` processes (0: this one)."""
    return torch.utils.data.DataLoader(
        _DecodedImages(paths, sizes_only), batch_sampler=batches, num_workers=num_workers, collate_fn=list,
    )


def size_batches(sizes: list[tuple[int, int]], extractor: "RegionExtractor", batch_size: int) -> list[list[int]]:
    """Positions of `sizes` ((width, height) of each image) in batches of up to `batch_size` images of
    one padded network-input size, in first-appearance order of the sizes."""
    groups: dict[tuple[int, int], list[int]] = {}
    for position, (width, height) in enumerate(sizes):
        groups.setdefault(extractor.padded_size(width, height), []).append(position)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def extract_image_set(
    image_paths: list[Path],
    out_path: str | Path,
    extractor_cfg: dict[str, Any],
    *,
    shard: int = 0,
    num_shards: int = 1,
    skip_bad_images: bool = False,
    feature_dtype: str = "float16",
    batch_size: int = 1,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Extract regions of one shard of an image set into one feature file (written atomically).

    img_id is the file stem. Images go through the detector up to `batch_size` at a time, each batch
    of one padded input size, so that batching changes no feature beyond float rounding (the batch
    size is recorded in the file's provenance, as is the device); `num_workers` DataLoader workers
    decode them (0: this process). Bad images (missing, undecodable) fail with an InputError naming the file, or with
    `skip_bad_images` are listed in `<out_path>.skipped.txt` and left out. Returns statistics.
    """
    out_path = Path(out_path)
    if not image_paths:
        raise InputError("the image list is empty: no images to extract features for", out_path)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_unique_ids(image_paths)  # over the whole set, so that the shards merge
    paths = shard_of(image_paths, shard, num_shards)

    # Build the detector first: a wrong weights/config path should fail before any image work.
    extractor = build_extractor(extractor_cfg)

    # Every image is decoded once up front: the writer needs the final row count, and the batches the
    # image sizes. Decoding is cheap next to detection. The image is decoded again when its turn comes.
    bad: list[tuple[Path, str]] = []
    sizes: dict[int, tuple[int, int]] = {}
    chunks = [list(range(i, min(i + 16, len(paths)))) for i in range(0, len(paths), 16)]
    for batch in _decoded(paths, chunks, num_workers, sizes_only=True):
        for index, size, problem in batch:
            if problem is not None:
                if not skip_bad_images:
                    raise InputError(problem, paths[index])
                bad.append((paths[index], problem))
            else:
                sizes[index] = size
    decodable = sorted(sizes)
    good = [paths[index] for index in decodable]
    batches = size_batches([sizes[index] for index in decodable], extractor, batch_size)
    skipped_path = out_path.with_name(out_path.name + ".skipped.txt")
    if skip_bad_images:
        write_text(skipped_path, "".join(f"{path}\t{problem}\n" for path, problem in bad))
        if bad:
            log.warning("%s: skipped %d undecodable image(s), listed in %s", out_path, len(bad), skipped_path)

    provenance = {
        **extractor.provenance(),
        "device": str(extractor_cfg.get("device", "cpu")),
        "batch_size": batch_size,
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
    ) as writer, tqdm(total=len(good), desc=f"regions {out_path.name}", unit="img", mininterval=5.0) as progress:
        for batch in _decoded(good, batches, num_workers):
            failed = [(good[index], problem) for index, _, problem in batch if problem is not None]
            if failed:  # it decoded in the first pass: the file changed meanwhile
                raise InputError(f"cannot decode image any more ({failed[0][1]})", failed[0][0])
            records = extractor.extract_batch([image for _, image, _ in batch], [good[index].stem for index, _, _ in batch])
            for (index, _, _), record in zip(batch, records):
                writer.write(index, record)
                total_boxes += record.num_boxes
            progress.update(len(batch))
    seconds = time.perf_counter() - started
    return {
        "images": len(good),
        "skipped": len(bad),
        "skipped_list": str(skipped_path) if skip_bad_images else None,
        "shard": shard,
        "num_shards": num_shards,
        "batch_size": batch_size,
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
