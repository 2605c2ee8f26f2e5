"""Benchmark: region-extraction throughput (images/s) of each backend on this machine.

Backends and inputs:

* torchvision ``tiny`` (the embedded world's detector) on 96x96 rendered scenes (`semvlp.data.world`),
* torchvision ``resnet50_fpn`` (torchvision's fasterrcnn_resnet50_fpn layout) on scikit-image photos
  resized to 600 px short side (1000 px cap), as bottom-up-attention extracts,
* detectron2 model-zoo R50-FPN and R50-C4 at 600 px, when detectron2 is importable.

Weights are random unless given (`--tiny-weights`, `--resnet50-weights`): throughput depends on the
architecture and on the number of proposals scored (fixed per model), not on the weights. Every number
is one `RegionExtractor.extract` call per image (PIL image in, RegionRecord out, selection and re-pooling
included), after warm-up images, with the selection LXMERT uses (10-36 boxes, threshold 0.2).

    python benchmarks/extraction.py                       # torch's default thread count
    python benchmarks/extraction.py --threads 1 --images 20
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from semvlp.regions.extract import RegionExtractor, build_extractor  # noqa: E402
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
    from skimage import data

    images = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS]
    return [images[i % len(images)] for i in range(count)]


def measure(extractor: RegionExtractor, images: list[Image.Image], warmup: int) -> tuple[float, float]:
    """(images/s, mean boxes) over `images` after `warmup` untimed calls."""
    for image in images[:warmup]:
        extractor.extract(image)
    started = time.perf_counter()
    boxes = 0
    for image in images:
        boxes += extractor.extract(image).num_boxes
    return len(images) / (time.perf_counter() - started), boxes / len(images)


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
    parser.add_argument("--warmup", type=int, default=2)
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
            rate, mean_boxes = measure(extractor, images, args.warmup)
            rows.append((backend, model, inputs, extractor.feature_dim, len(images), mean_boxes, rate))

    print(f"device: {args.device}, torch threads: {torch.get_num_threads()}, torch {torch.__version__}")
    header = ("backend", "model", "input", "feature dim", "images", "boxes/img", "images/s", "s/image")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for backend, model, inputs, dim, count, mean_boxes, rate in rows:
        print(f"| {backend} | {model} | {inputs} | {dim} | {count} | {mean_boxes:.1f} | {rate:.2f} | {1 / rate:.3f} |")
    print("\nreproduce (from the repository root): python benchmarks/extraction.py " + shlex.join(sys.argv[1:]))


if __name__ == "__main__":
    main()
