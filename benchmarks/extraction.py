"""Benchmark: region-extraction throughput (images/s) of each backend on this machine.

Backends and inputs:

* torchvision ``tiny`` (the embedded world's detector) on 96x96 rendered scenes (`semvlp.data.world`),
* torchvision ``resnet50_fpn`` (torchvision's fasterrcnn_resnet50_fpn layout) on scikit-image photos at
  640 x 480, resized to 600 px short side (1000 px cap), as bottom-up-attention extracts,
* detectron2 model-zoo R50-FPN and R50-C4 at 600 px, when detectron2 is importable.

Weights are random unless given (`--tiny-weights`, `--resnet50-weights`): throughput depends on the
architecture and on the number of proposals scored (fixed per model), not on the weights. Every number
is `RegionExtractor.extract_batch` over batches of up to `--batch-sizes` images of one padded size (as
`extract_image_set` batches them) (PIL images in, RegionRecords
out, selection and re-pooling included), after warm-up batches, with the selection LXMERT uses (10-36
boxes, threshold 0.2). The speed-up of each batch size is against batch 1 in the same run; the largest
differences of batched against one-at-a-time records (boxes in pixels, features) are printed with it.
The last line is one JSON object with every row.

    python benchmarks/extraction.py                       # torch's default thread count
    python benchmarks/extraction.py --threads 1 --images 20 --batch-sizes 1 4 8
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from semvlp.regions.extract import RegionExtractor, build_extractor, size_batches  # noqa: E402
from semvlp.regions.torchvision_backend import DetectorSpec, build_detector, save_detector  # noqa: E402

SELECTION = {"score_threshold": 0.2, "nms_iou": 0.3, "min_boxes": 10, "max_boxes": 36}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def scenes(count: int) -> list[Image.Image]:
    """Rendered 96x96 scenes of the embedded world (seeded)."""
    import random

    from semvlp.data.world import WorldSpec, render_scene, sample_scene

    spec = WorldSpec(seed=0)
    rng = random.Random(0)
    return [render_scene(sample_scene(rng, spec), spec.image_size) for _ in range(count)]


def photos(count: int) -> list[Image.Image]:
    """scikit-image photos at 640 x 480, COCO's most common size (so that batches fill up)."""
    from skimage import data

    images = [Image.fromarray(getattr(data, name)()).convert("RGB").resize((640, 480)) for name in PHOTOS]
    return [images[i % len(images)] for i in range(count)]


def measure(extractor: RegionExtractor, images: list[Image.Image], batch_size: int, warmup: int) -> tuple[float, list]:
    """(images/s, records) over `images` in batches of `batch_size`, after `warmup` untimed batches."""
    # as extract_image_set batches: images of one padded input size together
    batches = [[images[i] for i in batch] for batch in size_batches([im.size for im in images], extractor, batch_size)]
    for batch in batches[:warmup]:
        extractor.extract_batch(batch, [""] * len(batch))
    started = time.perf_counter()
    records = []
    for batch in batches:
        records += extractor.extract_batch(batch, [""] * len(batch))
    return len(images) / (time.perf_counter() - started), records


def differences(reference: list, other: list) -> dict[str, float | bool]:
    """Largest differences between one-at-a-time and batched records of the same images."""
    same_boxes = all(a.num_boxes == b.num_boxes and (a.obj_ids == b.obj_ids).all() for a, b in zip(reference, other))
    if not same_boxes:
        return {"same_selection": False}
    return {
        "same_selection": True,
        "max_box_px": max(float(abs(a.boxes - b.boxes).max()) for a, b in zip(reference, other)),
        "max_feature": max(float(abs(a.features - b.features).max()) for a, b in zip(reference, other)),
        "max_abs_feature": max(float(abs(a.features).max()) for a in reference),
    }


def random_torchvision_weights(backbone: str, folder: Path) -> Path:
    torch.manual_seed(0)
    categories = [f"class_{i}" for i in range(5 if backbone == "tiny" else 1600)]
    attributes = [f"attr_{i}" for i in range(8 if backbone == "tiny" else 400)]
    path = folder / f"{backbone}_random.pt"
    save_detector(build_detector(DetectorSpec.create(backbone, categories, attributes)), path)
    return path


def random_detectron2_weights(config_name: str, folder: Path) -> tuple[Path, Path]:
    import detectron2
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    # Where detectron2's setup.py puts the model-zoo configs inside the package.
    config = Path(detectron2.__file__).parent / "model_zoo" / "configs" / config_name
    cfg = get_cfg()
    cfg.merge_from_file(str(config))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    weights = folder / (config_name.replace("/", "_") + ".pth")
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    return config, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=12, help="timed images per large model (tiny: 10x)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches before timing")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="the first is the baseline")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny-weights", type=Path, default=None)
    parser.add_argument("--resnet50-weights", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory(prefix="semvlp-extract-bench-") as tmp:
        folder = Path(tmp)
        tiny_weights = args.tiny_weights or random_torchvision_weights("tiny", folder)
        resnet_weights = args.resnet50_weights or random_torchvision_weights("resnet50_fpn", folder)
        runs = [
            ("torchvision", "tiny", "96 px scenes", {"weights": str(tiny_weights)}, scenes(10 * args.images)),
            ("torchvision", "resnet50_fpn", "600 px photos",
             {"weights": str(resnet_weights), "min_size": 600, "max_size": 1000}, photos(args.images)),
        ]
        if importlib.util.find_spec("detectron2") is not None:
            for name in ("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", "COCO-Detection/faster_rcnn_R_50_C4_1x.yaml"):
                config, weights = random_detectron2_weights(name, folder)
                runs.append(("detectron2", Path(name).stem, "600 px photos",
                             {"config_file": str(config), "weights": str(weights), "min_size": 600, "max_size": 1000},
                             photos(args.images)))
        else:
            print("detectron2 is not installed: its rows are skipped\n")
        for backend, model, inputs, cfg, images in runs:
            extractor = build_extractor({"backend": backend, "selection": SELECTION, "device": args.device, **cfg})
            baseline_rate, baseline = None, None
            for batch_size in args.batch_sizes:
                rate, records = measure(extractor, images, batch_size, args.warmup)
                if baseline is None:
                    baseline_rate, baseline = rate, records
                rows.append({
                    "backend": backend, "model": model, "input": inputs, "feature_dim": extractor.feature_dim,
                    "images": len(images), "batch_size": batch_size,
                    "boxes_per_image": sum(r.num_boxes for r in records) / len(records),
                    "images_per_s": rate, "speedup": rate / baseline_rate, **differences(baseline, records),
                })

    print(f"device: {args.device}, torch threads: {torch.get_num_threads()}, torch {torch.__version__}")
    header = ("backend", "model", "input", "dim", "images", "batch", "boxes/img", "images/s", "speed-up", "max box diff px", "max feature diff")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        diff = (f"{r['max_box_px']:.2g} | {r['max_feature']:.2g} (of {r['max_abs_feature']:.2g})" if r["same_selection"]
                else "other boxes | -")
        print(f"| {r['backend']} | {r['model']} | {r['input']} | {r['feature_dim']} | {r['images']} | {r['batch_size']} | "
              f"{r['boxes_per_image']:.1f} | {r['images_per_s']:.2f} | {r['speedup']:.2f} | {diff} |")
    print("\nreproduce (from the repository root): python benchmarks/extraction.py " + shlex.join(sys.argv[1:]))
    print(json.dumps({"device": args.device, "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
