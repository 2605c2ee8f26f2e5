"""Tests of region extraction: box selection, the torchvision backend (trained tiny detector on rendered
scenes, resnet50_fpn on real photos), feature files with sharding and bad images, detectron2 skipping."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from semvlp.errors import InputError
from semvlp.features import FeatureReader
from semvlp.regions.detectron2_backend import BackendUnavailableError, build_detectron2_backend
from semvlp.regions.extract import build_extractor, extract_image_set, list_images, shard_of
from semvlp.regions.selection import SelectionConfig, select_regions
from semvlp.regions.torchvision_backend import DetectorSpec, build_detector, load_detector, save_detector
from semvlp.regions.train import TrainConfig, train_detector

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220)}
SIZES = {"small": (14, 20), "large": (28, 38)}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, spinning OpenMP threads slow these small models
    down several-fold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# Rendered scenes in COCO format (shapes as categories, colour and size as attributes)


def render_scenes(out_dir: Path, num_images: int, seed: int, size: int = 96) -> Path:
    """Write `num_images` PNG scenes and their COCO instances json (with "attributes"); return its path."""
    rng = np.random.default_rng(seed)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    attribute_names = [*COLOURS, *SIZES]
    attribute_id = {name: i + 1 for i, name in enumerate(attribute_names)}
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        background = tuple(int(v) for v in rng.integers(225, 250, size=3))
        canvas = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(canvas)
        placed: list[tuple[float, float, float, float]] = []
        for _ in range(int(rng.integers(2, 6))):
            for _attempt in range(30):  # place without overlap, give up on crowded scenes
                shape = SHAPES[rng.integers(len(SHAPES))]
                colour = list(COLOURS)[rng.integers(len(COLOURS))]
                size_name = list(SIZES)[rng.integers(len(SIZES))]
                side = int(rng.integers(*SIZES[size_name]))
                x, y = (int(v) for v in rng.integers(1, size - side - 1, size=2))
                box = (float(x), float(y), float(x + side), float(y + side))
                if all(box[2] <= p[0] or p[2] <= box[0] or box[3] <= p[1] or p[3] <= box[1] for p in placed):
                    break
            else:
                continue
            placed.append(box)
            fill = COLOURS[colour]
            if shape == "circle":
                draw.ellipse([box[0], box[1], box[2] - 1, box[3] - 1], fill=fill)
            elif shape == "square":
                draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=fill)
            else:
                draw.polygon([(box[0], box[3] - 1), (box[2] - 1, box[3] - 1), ((box[0] + box[2]) / 2, box[1])], fill=fill)
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": SHAPES.index(shape) + 1,
                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                "area": (box[2] - box[0]) * (box[3] - box[1]),
                "iscrowd": 0,
                "attribute_ids": [attribute_id[colour], attribute_id[size_name]],
            })
        file_name = f"scene_{image_id:05d}.png"
        canvas.save(images_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
    instances = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(SHAPES)],
        "attributes": [{"id": i, "name": name} for name, i in attribute_id.items()],
    }
    instances_path = out_dir / "instances.json"
    instances_path.write_text(json.dumps(instances))
    return instances_path


def truncated_png(path: Path) -> Path:
    """A PNG whose data stream stops half-way (a partially copied file)."""
    Image.new("RGB", (64, 64), (200, 10, 10)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def photo(name: str) -> Image.Image:
    """A real photo shipped with scikit-image."""
    from skimage import data

    return Image.fromarray(getattr(data, name)())


# --------------------------------------------------------------------------------------------------
# Selection on hand-computed cases


def _box(x1: float, y1: float, x2: float, y2: float) -> list[float]:
    return [x1, y1, x2, y2]


def test_selection_per_class_nms_max_score_after_nms_and_argmax_labels():
    # Proposals 0 and 1 overlap (IoU 0.9); proposal 2 is apart. Same box for every class.
    boxes = torch.tensor([_box(0, 0, 10, 10), _box(0, 0, 10, 9), _box(50, 50, 60, 60)])  # (3, 4)
    scores = torch.tensor([[0.90, 0.05], [0.80, 0.10], [0.10, 0.60]])  # (3, 2)
    # class 0 NMS keeps 0 (0.9) and 2 (0.1), suppresses 1; class 1 keeps 2 (0.6) and 1 (0.1), suppresses 0.
    # Max score after NMS: p0 0.9, p1 0.1, p2 0.6 -> above 0.2: p0, p2.
    kept = select_regions(boxes, scores, SelectionConfig(score_threshold=0.2, nms_iou=0.3, min_boxes=0, max_boxes=36))
    assert kept.indices.tolist() == [0, 2]
    assert kept.obj_ids.tolist() == [0, 1]
    assert kept.obj_confs.tolist() == pytest.approx([0.9, 0.6])
    assert kept.max_conf.tolist() == pytest.approx([0.9, 0.6])

    # Topping up to min_boxes=3 adds p1, ranked by its post-NMS score (0.1), labelled by its arg-max
    # class (0, score 0.8) as the bottom-up-attention scripts do.
    kept = select_regions(boxes, scores, SelectionConfig(min_boxes=3, max_boxes=36))
    assert kept.indices.tolist() == [0, 2, 1]
    assert kept.obj_ids.tolist() == [0, 1, 0]
    assert kept.obj_confs.tolist() == pytest.approx([0.9, 0.6, 0.8])
    assert kept.max_conf.tolist() == pytest.approx([0.9, 0.6, 0.1])
    assert kept.boxes.tolist() == [_box(0, 0, 10, 10), _box(50, 50, 60, 60), _box(0, 0, 10, 9)]


def test_selection_uses_class_specific_boxes():
    # The class-0 boxes of the two proposals coincide, their class-1 boxes are far apart.
    boxes = torch.tensor([
        [_box(0, 0, 10, 10), _box(0, 0, 10, 10)],
        [_box(0, 0, 10, 10), _box(40, 40, 50, 50)],
    ])  # (2, 2, 4)
    scores = torch.tensor([[0.7, 0.2], [0.6, 0.3]])
    kept = select_regions(boxes, scores, SelectionConfig(min_boxes=0, max_boxes=5))
    # p1 loses class 0 to p0 but survives class 1 (0.3 >= 0.2): both kept; p1's box is its class-0 box
    # (its arg-max label), not the class-1 box that earned its place.
    assert kept.indices.tolist() == [0, 1]
    assert kept.max_conf.tolist() == pytest.approx([0.7, 0.3])
    assert kept.boxes.tolist() == [_box(0, 0, 10, 10), _box(0, 0, 10, 10)]

    # Below the threshold, p1 would be dropped.
    kept = select_regions(boxes, scores, SelectionConfig(score_threshold=0.35, min_boxes=0, max_boxes=5))
    assert kept.indices.tolist() == [0]


def test_selection_caps_at_max_boxes_best_first_and_keeps_all_when_few():
    boxes = torch.tensor([_box(20 * i, 0, 20 * i + 10, 10) for i in range(5)])  # disjoint
    scores = torch.tensor([[0.3], [0.9], [0.5], [0.7], [0.25]])
    kept = select_regions(boxes, scores, SelectionConfig(min_boxes=1, max_boxes=3))
    assert kept.indices.tolist() == [1, 3, 2]
    kept = select_regions(boxes, scores, SelectionConfig(min_boxes=10, max_boxes=36))
    assert kept.indices.tolist() == [1, 3, 2, 0, 4]  # only 5 proposals exist


def test_selection_tops_up_suppressed_proposals_by_raw_score():
    # Four copies of one box: NMS leaves only the best per class; the others have post-NMS score 0
    # and are ordered among themselves by their raw best score.
    boxes = torch.tensor([_box(0, 0, 10, 10)] * 4)
    scores = torch.tensor([[0.15, 0.10], [0.40, 0.30], [0.12, 0.35], [0.05, 0.02]])
    kept = select_regions(boxes, scores, SelectionConfig(min_boxes=4, max_boxes=4))
    # class 0 keeps p1 (0.40); class 1 keeps p2 (0.35); p0 (raw 0.15) before p3 (raw 0.05).
    assert kept.indices.tolist() == [1, 2, 0, 3]
    assert kept.max_conf.tolist() == pytest.approx([0.40, 0.35, 0.0, 0.0])
    assert kept.obj_ids.tolist() == [0, 1, 0, 0]


def _reference_selection(boxes: torch.Tensor, scores: torch.Tensor, cfg: SelectionConfig) -> tuple[list[int], torch.Tensor]:
    """The bottom-up-attention loop, written out class by class: (kept rows, max score after NMS)."""
    from torchvision.ops import nms

    max_conf = torch.zeros(len(scores))
    for cls in range(scores.shape[1]):
        keep = nms(boxes[:, cls], scores[:, cls], cfg.nms_iou)
        max_conf[keep] = torch.maximum(max_conf[keep], scores[keep, cls])
    order = sorted(range(len(scores)), key=lambda i: (-max_conf[i].item(), -scores[i].max().item(), i))
    confident = int((max_conf >= cfg.score_threshold).sum())
    return order[: min(max(confident, cfg.min_boxes), cfg.max_boxes)], max_conf


def test_selection_matches_class_by_class_reference_on_random_proposals():
    # Peaked and flat score distributions, with and without top-ups: every pruning level of the fast
    # path must give the reference's exact selection.
    generator = torch.Generator().manual_seed(0)
    configs = [
        SelectionConfig(),
        SelectionConfig(min_boxes=36, max_boxes=36),
        SelectionConfig(score_threshold=0.5, min_boxes=0, max_boxes=5),
    ]
    for trial in range(24):
        num_proposals, num_classes = 60, 30
        xy = torch.rand(num_proposals, num_classes, 2, generator=generator) * 80
        wh = torch.rand(num_proposals, num_classes, 2, generator=generator) * 40 + 2
        boxes = torch.cat([xy, xy + wh], dim=-1)  # (R, C, 4)
        sharpness = (0.5, 3.0, 10.0)[trial % 3]
        logits = torch.randn(num_proposals, num_classes + 1, generator=generator) * sharpness
        scores = torch.softmax(logits, dim=1)[:, 1:]  # background column dropped
        cfg = configs[trial // 3 % 3]
        kept = select_regions(boxes, scores, cfg)
        reference_rows, reference_max_conf = _reference_selection(boxes, scores, cfg)
        assert kept.indices.tolist() == reference_rows
        assert torch.equal(kept.max_conf, reference_max_conf[kept.indices])
        assert torch.equal(kept.boxes, boxes[kept.indices, kept.obj_ids])


def test_selection_config_rejects_inconsistent_settings():
    with pytest.raises(ValueError, match="min_boxes"):
        SelectionConfig(min_boxes=40, max_boxes=36)
    with pytest.raises(ValueError, match="nms_iou"):
        SelectionConfig(nms_iou=0.0)
    with pytest.raises(ValueError, match="unknown selection settings"):
        SelectionConfig.from_dict({"conf_threshold": 0.2})


# --------------------------------------------------------------------------------------------------
# The tiny torchvision detector trained on rendered scenes

SCENE_SELECTION = {"score_threshold": 0.2, "nms_iou": 0.3, "min_boxes": 10, "max_boxes": 36}
# Short but real: 60 steps of 8 scenes reach ~0.8 held-out recall in ~10 s on one CPU core.
SHORT_TRAINING = dict(epochs=100, max_steps=60, batch_size=8, warmup_steps=5, learning_rate=0.004, holdout_fraction=0.1)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes")
    render_scenes(out, 160, seed=2)
    return out


@pytest.fixture(scope="module")
def trained(scenes, tmp_path_factory) -> tuple[Path, dict]:
    checkpoint = tmp_path_factory.mktemp("detector") / "tiny.pt"
    metrics = train_detector(scenes / "instances.json", scenes / "images", checkpoint, TrainConfig(**SHORT_TRAINING))
    return checkpoint, metrics


def test_trained_tiny_detector_finds_the_shapes(trained):
    checkpoint, metrics = trained
    assert metrics["steps"] == 60 and len(metrics["loss_history"]) == 60
    history = metrics["loss_history"]
    assert all(np.isfinite(history))
    assert np.mean(history[-10:]) < 0.6 * np.mean(history[:5])
    assert metrics["holdout_images"] == 16 and metrics["gt_boxes"] > 30
    # Share of held-out GT shapes that a kept region covers at IoU >= 0.5 with the right class.
    assert metrics["gt_recall"] >= 0.5
    assert metrics["attribute_accuracy"] is not None and metrics["attribute_accuracy"] >= 0.5


def test_checkpoint_rebuilds_the_detector_with_its_vocabularies(trained):
    checkpoint, metrics = trained
    detector = load_detector(checkpoint)
    assert detector.spec.backbone == "tiny"
    assert detector.spec.categories == list(SHAPES)
    assert detector.spec.attributes == [*COLOURS, *SIZES]
    record = torch.load(checkpoint, weights_only=True)["training"]
    assert record["category_ids"] == [1, 2, 3]
    assert record["metrics"]["gt_recall"] == metrics["gt_recall"]
    assert not list(checkpoint.parent.glob(".tmp-*"))  # written atomically, nothing left behind


def test_training_is_seeded(scenes, tmp_path):
    short = dict(SHORT_TRAINING, max_steps=4)
    runs = [
        train_detector(
            scenes / "instances.json", scenes / "images", tmp_path / f"run{i}.pt", TrainConfig(**short, seed=seed)
        )
        for i, seed in enumerate([0, 0, 1])
    ]
    assert runs[0]["loss_history"] == runs[1]["loss_history"]
    assert runs[0]["loss_history"] != runs[2]["loss_history"]


def test_tiny_extraction_contract_on_scenes(trained, scenes):
    checkpoint, _ = trained
    extractor = build_extractor({"backend": "torchvision", "weights": str(checkpoint), "selection": SCENE_SELECTION})
    assert extractor.feature_dim == 256
    image = Image.open(scenes / "images" / "scene_00001.png")
    record = extractor.extract(image, img_id="scene_00001")
    n = record.num_boxes
    assert 10 <= n <= 36
    assert (record.img_id, record.img_h, record.img_w) == ("scene_00001", 96, 96)
    assert record.features.shape == (n, 256) and record.features.dtype == np.float32
    assert np.isfinite(record.features).all()
    assert (record.boxes[:, 0] >= 0).all() and (record.boxes[:, 2] <= 96).all()
    assert (record.boxes[:, 1] >= 0).all() and (record.boxes[:, 3] <= 96).all()
    assert (record.boxes[:, 2:] >= record.boxes[:, :2]).all()
    assert record.obj_ids.min() >= 0 and record.obj_ids.max() < len(SHAPES)
    assert record.attr_ids.min() >= 0 and record.attr_ids.max() < len(COLOURS) + len(SIZES)
    assert ((record.obj_confs > 0) & (record.obj_confs <= 1)).all()
    assert ((record.attr_confs > 0) & (record.attr_confs <= 1)).all()


def test_boxes_are_mapped_back_to_original_pixels(trained, scenes):
    checkpoint, _ = trained
    extractor = build_extractor({"backend": "torchvision", "weights": str(checkpoint), "selection": SCENE_SELECTION})
    image = Image.open(scenes / "images" / "scene_00002.png").convert("RGB")
    # Nearest 2x upscaling, which the detector's bilinear 0.5x resize undoes exactly: the network sees
    # the same pixels, so only the box mapping differs.
    doubled = image.resize((192, 192), Image.NEAREST)
    small, large = extractor.extract(image), extractor.extract(doubled)
    assert (large.img_h, large.img_w) == (192, 192)
    np.testing.assert_array_equal(large.obj_ids, small.obj_ids)
    np.testing.assert_allclose(large.boxes, 2 * small.boxes, atol=1e-3)
    np.testing.assert_allclose(large.features, small.features, atol=1e-5)


def test_features_are_pooled_from_the_exported_boxes(trained, scenes):
    """Re-pooling the exported boxes through the box head gives the exported features."""
    checkpoint, _ = trained
    detector = load_detector(checkpoint)
    extractor = build_extractor({"backend": "torchvision", "weights": str(checkpoint), "selection": SCENE_SELECTION})
    image = Image.open(scenes / "images" / "scene_00003.png").convert("RGB")
    record = extractor.extract(image)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255  # (3, 96, 96)
    with torch.no_grad():
        image_list, _ = detector.detector.transform([pixels])
        features = detector.feature_maps(image_list.tensors)
        pooled = detector.box_features(features, [torch.from_numpy(record.boxes)], image_list.image_sizes)
    np.testing.assert_allclose(record.features, pooled.numpy(), atol=1e-4)


def test_detector_checkpoint_round_trip(tmp_path, scenes):
    torch.manual_seed(0)
    spec = DetectorSpec.create("tiny", list(SHAPES), ["red"], tiny_channels=16, representation_size=32)
    detector = build_detector(spec).eval()
    save_detector(detector, tmp_path / "d.pt")
    loaded = load_detector(tmp_path / "d.pt")
    image = Image.open(scenes / "images" / "scene_00004.png")
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255
    a = detector.extract_regions(pixels, SelectionConfig())
    b = loaded.extract_regions(pixels, SelectionConfig())
    assert torch.equal(a.features, b.features) and torch.equal(a.boxes, b.boxes)
    assert loaded.spec == spec


# --------------------------------------------------------------------------------------------------
# resnet50_fpn (torchvision's architecture) on real photos, random weights from a local file


@pytest.fixture(scope="module")
def resnet50_fpn_weights(tmp_path_factory) -> Path:
    """torchvision's own fasterrcnn_resnet50_fpn, randomly initialised, saved as a plain state dict."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=6)
    path = tmp_path_factory.mktemp("r50") / "fasterrcnn_resnet50_fpn_random.pth"
    torch.save(model.state_dict(), path)
    return path


def test_resnet50_fpn_extraction_contract_on_real_photos(resnet50_fpn_weights):
    from semvlp.io import file_digest

    categories = ["person", "cup", "cat", "table", "plant"]
    extractor = build_extractor({
        "backend": "torchvision",
        "weights": str(resnet50_fpn_weights),
        "backbone": "resnet50_fpn",
        "categories": categories,
        "min_size": 320,  # smaller than the 600 px default to keep the test fast
        "max_size": 512,
        "selection": SCENE_SELECTION,
    })
    assert extractor.feature_dim == 1024
    provenance = extractor.provenance()
    assert provenance["backend"] == "torchvision"
    assert provenance["weights_sha256"] == file_digest(resnet50_fpn_weights)
    assert provenance["detector"]["categories"] == categories
    assert provenance["selection"] == SCENE_SELECTION
    for name in ("astronaut", "coffee", "chelsea"):
        image = photo(name)
        record = extractor.extract(image, img_id=name)
        n = record.num_boxes
        assert 10 <= n <= 36, name
        assert (record.img_h, record.img_w) == (image.height, image.width)
        assert record.features.shape == (n, 1024) and np.isfinite(record.features).all()
        assert (record.boxes >= 0).all()
        assert (record.boxes[:, [0, 2]] <= image.width).all() and (record.boxes[:, [1, 3]] <= image.height).all()
        assert record.obj_ids.max() < len(categories)
        assert not record.attr_ids.any() and not record.attr_confs.any()  # no attribute head


def test_plain_state_dict_with_wrong_class_names_count_is_rejected(resnet50_fpn_weights):
    with pytest.raises(InputError, match="5 foreground classes but 2 category names") as err:
        build_extractor({"backend": "torchvision", "weights": str(resnet50_fpn_weights), "categories": ["a", "b"]})
    assert err.value.path == resnet50_fpn_weights


# --------------------------------------------------------------------------------------------------
# Feature files: provenance, sharding, bad input


def _image_folder(scenes: Path, out: Path, count: int) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for source in sorted((scenes / "images").glob("*.png"))[:count]:
        target = out / source.name
        target.write_bytes(source.read_bytes())
        paths.append(target)
    return paths


def test_extract_image_set_writes_a_feature_file_with_provenance(trained, scenes, tmp_path):
    checkpoint, _ = trained
    cfg = {"backend": "torchvision", "weights": str(checkpoint), "selection": SCENE_SELECTION}
    paths = _image_folder(scenes, tmp_path / "images", 4)
    stats = extract_image_set(list(reversed(paths)), tmp_path / "features.h5", cfg)
    assert stats["images"] == 4 and stats["skipped"] == 0
    reader = FeatureReader(tmp_path / "features.h5")
    assert reader.ids == [p.stem for p in paths]
    assert reader.feature_dim == 256 and reader.max_boxes == 36 and reader.feature_dtype == "float16"
    assert reader.provenance["backend"] == "torchvision"
    assert reader.provenance["selection"] == SCENE_SELECTION
    assert reader.provenance["detector"]["categories"] == list(SHAPES)
    direct = build_extractor(cfg).extract(Image.open(paths[1]), img_id=paths[1].stem)
    stored = reader.get(paths[1].stem)
    np.testing.assert_allclose(stored.boxes, direct.boxes, rtol=1e-6)
    np.testing.assert_allclose(stored.features.astype(np.float32), direct.features, rtol=1e-2, atol=1e-2)
    np.testing.assert_array_equal(stored.obj_ids, direct.obj_ids)


def test_shards_cover_every_image_exactly_once(trained, scenes, tmp_path):
    checkpoint, _ = trained
    cfg = {"backend": "torchvision", "weights": str(checkpoint), "selection": SCENE_SELECTION}
    paths = _image_folder(scenes, tmp_path / "images", 7)
    shard_files = []
    for shard in range(3):
        shard_files.append(tmp_path / f"part{shard}.h5")
        extract_image_set(paths, shard_files[-1], cfg, shard=shard, num_shards=3)
    shard_ids = [FeatureReader(f).ids for f in shard_files]
    assert shard_ids[0] == [paths[i].stem for i in (0, 3, 6)]
    assert sorted(sum(shard_ids, [])) == sorted(p.stem for p in paths)
    assert [FeatureReader(f).provenance["shard"] for f in shard_files] == [0, 1, 2]
    assert [len(shard_of(paths, k, 20)) for k in range(20)] == [1] * 7 + [0] * 13
    with pytest.raises(ValueError, match="shard"):
        shard_of(paths, 3, 3)


@pytest.fixture()
def folder_with_bad_images(scenes, tmp_path) -> tuple[Path, list[Path], list[Path]]:
    images = tmp_path / "images"
    good = _image_folder(scenes, images, 2)
    bad = [truncated_png(images / "a_truncated.png"), images / "b_notes.jpg"]
    bad[1].write_text("this is not a JPEG\n")
    return images, good, bad


def test_undecodable_image_fails_naming_the_file(trained, folder_with_bad_images, tmp_path):
    checkpoint, _ = trained
    images, _, bad = folder_with_bad_images
    out = tmp_path / "features.h5"
    with pytest.raises(InputError, match="a_truncated.png") as err:
        extract_image_set(list_images(images), out, {"backend": "torchvision", "weights": str(checkpoint)})
    assert err.value.path == bad[0]
    assert not out.exists()
    with pytest.raises(InputError, match="b_notes.jpg"):
        extract_image_set([bad[1]], out, {"backend": "torchvision", "weights": str(checkpoint)})


def test_skip_bad_images_lists_them_and_extracts_the_rest(trained, folder_with_bad_images, tmp_path):
    checkpoint, _ = trained
    images, good, bad = folder_with_bad_images
    out = tmp_path / "features.h5"
    stats = extract_image_set(
        list_images(images), out, {"backend": "torchvision", "weights": str(checkpoint)}, skip_bad_images=True
    )
    assert stats["skipped"] == 2 and stats["images"] == 2
    listed = (tmp_path / "features.h5.skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == [str(p) for p in bad]
    reader = FeatureReader(out)
    assert reader.ids == [p.stem for p in good]
    assert reader.provenance["num_skipped_images"] == 2


def test_missing_or_invalid_weights_fail_naming_the_file(scenes, tmp_path):
    missing = tmp_path / "nowhere" / "detector.pt"
    with pytest.raises(InputError, match="not found") as err:
        build_extractor({"backend": "torchvision", "weights": str(missing)})
    assert err.value.path == missing
    out = tmp_path / "features.h5"
    with pytest.raises(InputError) as err:
        extract_image_set(
            sorted((scenes / "images").glob("*.png"))[:2], out, {"backend": "torchvision", "weights": str(missing)}
        )
    assert err.value.path == missing and not out.exists()
    garbage = tmp_path / "detector.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(InputError, match="not a readable PyTorch weights file") as err:
        build_extractor({"backend": "torchvision", "weights": str(garbage)})
    assert err.value.path == garbage


def test_empty_image_list_fails(trained, tmp_path):
    checkpoint, _ = trained
    (tmp_path / "empty").mkdir()
    assert list_images(tmp_path / "empty") == []
    with pytest.raises(InputError, match="empty") as err:
        extract_image_set(
            list_images(tmp_path / "empty"), tmp_path / "f.h5", {"backend": "torchvision", "weights": str(checkpoint)}
        )
    assert err.value.path == tmp_path / "f.h5"
    with pytest.raises(InputError, match="image folder not found"):
        list_images(tmp_path / "absent")


def test_list_images_is_recursive_sorted_and_case_insensitive(tmp_path):
    for name in ("b/2.PNG", "a/1.jpg", "c.jpeg", "notes.txt", "a/deeper/0.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a/1.jpg", "a/deeper/0.png", "b/2.PNG", "c.jpeg"]


def test_one_store_over_two_folders_takes_a_shared_picture_once(tmp_path):
    """GQA's images are Visual Genome's (same ids): a vg store that also serves gqa lists both
    folders, each picture once (the first folder's file), and the images only GQA has."""
    for name in ("vg/10.jpg", "vg/11.jpg", "gqa/11.jpg", "gqa/n161313.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path / "vg", tmp_path / "gqa")]
    assert found == ["vg/10.jpg", "vg/11.jpg", "gqa/n161313.jpg"]


def test_duplicate_image_ids_fail(trained, scenes, tmp_path):
    checkpoint, _ = trained
    first = _image_folder(scenes, tmp_path / "x", 1)[0]
    second = tmp_path / "y" / first.name
    second.parent.mkdir()
    second.write_bytes(first.read_bytes())
    with pytest.raises(InputError, match="also the id of"):
        cfg = {"backend": "torchvision", "weights": str(checkpoint)}
        extract_image_set([first, second], tmp_path / "f.h5", cfg, num_shards=2)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        build_extractor({"backend": "caffe"})


# --------------------------------------------------------------------------------------------------
# detectron2 (optional dependency)


def test_detectron2_missing_config_fails_naming_it(tmp_path):
    weights = tmp_path / "model.pth"
    weights.write_bytes(b"x")
    missing = tmp_path / "faster_rcnn_R_101_C4_attr.yaml"
    with pytest.raises(InputError, match="config file not found") as err:
        build_detectron2_backend({"config_file": str(missing), "weights": str(weights)})
    assert err.value.path == missing


def test_detectron2_absent_gives_install_instructions(tmp_path):
    import importlib.util

    if importlib.util.find_spec("detectron2") is not None:
        pytest.skip("detectron2 is installed here")
    config, weights = tmp_path / "config.yaml", tmp_path / "model.pth"
    config.write_text("MODEL:\n  META_ARCHITECTURE: GeneralizedRCNN\n")
    weights.write_bytes(b"x")
    with pytest.raises(BackendUnavailableError, match="install it following"):
        build_extractor({"backend": "detectron2", "config_file": str(config), "weights": str(weights)})


def _detectron2_random_weights(config_name: str, tmp_path: Path) -> tuple[Path, Path]:
    """A model-zoo config shipped inside the detectron2 package and its randomly initialised weights."""
    import detectron2
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    # Where detectron2's setup.py puts the model-zoo configs inside the package.
    config = Path(detectron2.__file__).parent / "model_zoo" / "configs" / config_name
    cfg = get_cfg()
    cfg.merge_from_file(str(config))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg)
    # An untrained backbone's activations grow layer after layer (frozen batch norm at identity), so
    # random box deltas would push every proposal off the image; zero deltas keep proposals = anchors.
    for layer in (model.proposal_generator.rpn_head.anchor_deltas, model.roi_heads.box_predictor.bbox_pred):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    weights = tmp_path / "model_random.pth"
    torch.save({"model": model.state_dict()}, weights)
    return config, weights


@pytest.mark.parametrize(
    "config_name, feature_dim",
    [("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", 1024), ("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml", 2048)],
)
def test_detectron2_extraction_contract_on_real_photos(config_name, feature_dim, tmp_path):
    pytest.importorskip("detectron2", reason="detectron2 is optional and not installed; install it by its own instructions")
    config, weights = _detectron2_random_weights(config_name, tmp_path)
    extractor = build_extractor({
        "backend": "detectron2", "config_file": str(config), "weights": str(weights),
        "min_size": 320, "max_size": 512, "selection": SCENE_SELECTION,
    })
    assert extractor.feature_dim == feature_dim
    assert extractor.provenance()["num_object_classes"] == 80
    for name in ("astronaut", "coffee"):
        image = photo(name)
        record = extractor.extract(image, img_id=name)
        assert 10 <= record.num_boxes <= 36
        assert record.features.shape == (record.num_boxes, feature_dim)
        assert (record.boxes[:, [0, 2]] <= image.width).all() and (record.boxes[:, [1, 3]] <= image.height).all()
        assert record.obj_ids.max() < 80


# --------------------------------------------------------------------------------------------------
# The config-to-backend contract, batched extraction, EXIF orientation


@pytest.mark.parametrize("backend", ["torchvision", "detectron2"])
def test_the_configs_extractor_settings_are_what_the_backend_reads(backend):
    """From a schema-validated config (defaults applied), the settings the extract_regions rule builds
    hold only keys its backend reads, and every key the schema documents for the backend means
    something there (or to the detector trained here). Needs no detectron2."""
    import yaml

    from semvlp.config import extraction_config, validate_config
    from semvlp.regions.extract import BACKEND_SETTINGS, TRAINING_SETTINGS, extractor_settings

    repo = Path(__file__).resolve().parent.parent
    config = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    config["regions"]["backend"] = backend
    if backend == "detectron2":
        config["regions"]["detectron2"] = {"config_file": "faster_rcnn_R_101_C4_attr.yaml", "weights": "model.pkl"}
    settings = extractor_settings(extraction_config(validate_config(config)), "results/detector/detector.pt")
    accepted = BACKEND_SETTINGS[backend]
    training = set(TRAINING_SETTINGS.get(backend, ()))
    assert set(settings) <= accepted, f"the backend does not read {sorted(set(settings) - accepted)}"
    schema = yaml.safe_load((repo / "workflow" / "schemas" / "config.schema.yaml").read_text())
    documented = schema["properties"]["regions"]["properties"][backend]["properties"]
    assert set(documented) <= accepted | training, f"documented but read by nothing: {sorted(set(documented) - accepted - training)}"
    assert {key for key, value in documented.items() if "default" in value} - training <= set(settings)


def test_the_rules_torchvision_settings_build_the_trained_detector(trained):
    import yaml

    from semvlp.config import extraction_config, validate_config
    from semvlp.regions.extract import extractor_settings

    checkpoint, _ = trained
    config = yaml.safe_load((Path(__file__).resolve().parent.parent / "config" / "config.yaml").read_text())
    extractor = build_extractor(extractor_settings(extraction_config(validate_config(config)), str(checkpoint)))
    assert extractor.provenance()["weights"] == str(checkpoint) and extractor.feature_dim == 256


def _max_differences(single, batched) -> dict[str, float]:
    """Largest differences between two lists of records of the same images."""
    assert [r.num_boxes for r in single] == [r.num_boxes for r in batched]
    return {
        "boxes_px": max(float(np.abs(a.boxes - b.boxes).max()) for a, b in zip(single, batched)),
        "features": max(float(np.abs(a.features - b.features).max()) for a, b in zip(single, batched)),
        "feature_scale": max(float(np.abs(a.features).max()) for a in single),
        "obj_confs": max(float(np.abs(a.obj_confs - b.obj_confs).max()) for a, b in zip(single, batched)),
    }


def photo_extractor(weights: Path):
    return build_extractor({
        "backend": "torchvision", "weights": str(weights), "backbone": "resnet50_fpn",
        "categories": ["person", "cup", "cat", "table", "plant"], "min_size": 320, "max_size": 512,
        "selection": SCENE_SELECTION,
    })


def test_a_batch_of_one_padded_size_matches_one_image_at_a_time(resnet50_fpn_weights):
    """Four real photos cut to 400 x 300: one network-input size, so the batch pads nothing more than
    each image alone. Same boxes, classes and order; the measured differences are float rounding."""
    extractor = photo_extractor(resnet50_fpn_weights)
    names = ("astronaut", "coffee", "chelsea", "rocket")
    images = [photo(name).convert("RGB").crop((0, 0, 400, 300)) for name in names]
    assert len({extractor.padded_size(*image.size) for image in images}) == 1
    single = [extractor.extract(image, name) for image, name in zip(images, names)]
    batched = extractor.extract_batch(images, list(names))
    differences = _max_differences(single, batched)
    print("one padded size, batch of 4 vs one at a time:", differences)
    for a, b in zip(single, batched):
        np.testing.assert_array_equal(a.obj_ids, b.obj_ids)
    assert differences["boxes_px"] <= 1e-2 and differences["features"] <= 1e-3 and differences["obj_confs"] <= 1e-4


def test_images_of_other_sizes_in_one_batch_get_other_boxes_so_extract_image_set_groups_by_size(resnet50_fpn_weights, tmp_path):
    """A batch pads every image to its largest: an image with more padding than it has alone gets other
    proposals (anchors over the padding compete for the RPN's top-k) and so other boxes, the
    batching problem py-bottom-up-attention#3 reports. extract_image_set batches by padded size, so its
    file is the same at any batch size."""
    extractor = photo_extractor(resnet50_fpn_weights)
    names = ("astronaut", "coffee", "chelsea", "camera", "rocket")  # 512x512, 400x600, 300x451, 512x512, 427x640
    images = [photo(name).convert("RGB") for name in names]
    single = [extractor.extract(image, name) for image, name in zip(images, names)]
    mixed = extractor.extract_batch(images, list(names))
    moved = [float(np.abs(a.boxes - b.boxes).max()) if a.num_boxes == b.num_boxes else float("inf") for a, b in zip(single, mixed)]
    print("mixed sizes in one batch, largest box move per image (px):", dict(zip(names, moved)))
    assert max(moved) > 10  # mixing sizes is not harmless: that is why extract_image_set groups them

    for name, image in zip(names, images):
        image.save(tmp_path / f"{name}.png")
    paths = sorted(tmp_path.glob("*.png"))
    cfg = {"backend": "torchvision", "weights": str(resnet50_fpn_weights), "backbone": "resnet50_fpn",
           "categories": ["person", "cup", "cat", "table", "plant"], "min_size": 320, "max_size": 512, "selection": SCENE_SELECTION}
    extract_image_set(paths, tmp_path / "b1.h5", cfg, batch_size=1, feature_dtype="float32")
    extract_image_set(paths, tmp_path / "b4.h5", cfg, batch_size=4, feature_dtype="float32")
    one, four = FeatureReader(tmp_path / "b1.h5"), FeatureReader(tmp_path / "b4.h5")
    differences = _max_differences([one.get(i) for i in one.ids], [four.get(i) for i in four.ids])
    print("extract_image_set, batch 4 vs batch 1:", differences)
    assert differences["boxes_px"] <= 1e-2 and differences["features"] <= 1e-3


def test_extract_image_set_gives_the_same_file_at_any_batch_size_and_worker_count(trained, scenes, tmp_path):
    checkpoint, _ = trained
    cfg = {"backend": "torchvision", "weights": str(checkpoint), "selection": SCENE_SELECTION}
    paths = _image_folder(scenes, tmp_path / "images", 7)
    readers = {}
    for batch_size, workers in ((1, 0), (3, 2)):
        out = tmp_path / f"b{batch_size}w{workers}.h5"
        stats = extract_image_set(paths, out, cfg, batch_size=batch_size, num_workers=workers, feature_dtype="float32")
        assert stats["images"] == 7 and stats["batch_size"] == batch_size
        readers[batch_size] = FeatureReader(out)
        assert readers[batch_size].provenance["batch_size"] == batch_size
        assert readers[batch_size].provenance["device"] == "cpu"
    one, three = readers[1], readers[3]
    assert one.ids == three.ids
    single = [one.get(i) for i in one.ids]
    batched = [three.get(i) for i in three.ids]
    differences = _max_differences(single, batched)
    assert differences["boxes_px"] <= 1e-3 and differences["features"] <= 1e-4, differences


def _jpeg_with_orientation(image: Image.Image, path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    image.save(path, quality=100, subsampling=0, exif=exif)


def test_a_rotated_jpeg_with_its_exif_orientation_is_extracted_upright(resnet50_fpn_weights, tmp_path):
    """A camera stores the sensor's pixels and says in EXIF how to turn them; extraction must see the
    photo upright. A real photo, stored turned by 90 degrees with orientation 6 ("rotate 90 CW to view")."""
    from semvlp.regions.extract import load_image

    upright = photo("coffee").convert("RGB")  # 600 x 400: both sides multiples of 8, so the JPEG blocks turn with it
    _jpeg_with_orientation(upright.transpose(Image.Transpose.ROTATE_90), tmp_path / "rotated.jpg", 6)
    stored = Image.open(tmp_path / "rotated.jpg").convert("RGB")
    assert stored.size == (upright.height, upright.width)  # the file's pixels are turned
    seen = load_image(tmp_path / "rotated.jpg")
    # exactly the file's pixels turned back, and the photo as it was (JPEG at quality 100 loses little)
    assert np.array_equal(np.asarray(seen), np.asarray(stored.transpose(Image.Transpose.ROTATE_270)))
    assert seen.size == upright.size
    assert np.abs(np.asarray(seen, np.int16) - np.asarray(upright, np.int16)).mean() < 1.0

    extractor = photo_extractor(resnet50_fpn_weights)
    record = extractor.extract(seen, "rotated")
    turned_back = extractor.extract(stored.transpose(Image.Transpose.ROTATE_270), "reference")
    assert (record.img_w, record.img_h) == upright.size
    assert np.array_equal(record.boxes, turned_back.boxes) and np.array_equal(record.obj_ids, turned_back.obj_ids)
    assert (record.boxes[:, [0, 2]] <= upright.width).all() and (record.boxes[:, [1, 3]] <= upright.height).all()
    # the file read without its orientation is another image: other size, other boxes
    assert extractor.extract(stored, "sideways").img_w == upright.height


@pytest.mark.slow
def test_detectron2_backend_through_the_workflow(tmp_path):
    """regions.backend: detectron2 from config to feature store: a random-weight R50-C4 Faster R-CNN with
    1600 classes (the bottom-up-attention class count), `attributes` left at its schema default."""
    pytest.importorskip("detectron2", reason="detectron2 is optional and not installed; install it by its own instructions")
    import yaml
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from conftest import TINY, run_snakemake

    import detectron2

    cfg = get_cfg()
    cfg.merge_from_file(str(Path(detectron2.__file__).parent / "model_zoo" / "configs" / "COCO-Detection" / "faster_rcnn_R_50_C4_1x.yaml"))
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1600
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 192, 320  # the embedded world's 96 px scenes, upscaled
    torch.manual_seed(0)
    model = build_model(cfg)
    for layer in (model.proposal_generator.rpn_head.anchor_deltas, model.roi_heads.box_predictor.bbox_pred):
        torch.nn.init.zeros_(layer.weight)  # random deltas would push every box off an untrained net's image
        torch.nn.init.zeros_(layer.bias)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "r50_c4_1600.yaml").write_text(cfg.dump())
    torch.save({"model": model.state_dict()}, tmp_path / "models" / "r50_c4_1600.pth")
    override = {"regions": {"backend": "detectron2", "batch_size": 2,
                            "detectron2": {"config_file": "models/r50_c4_1600.yaml", "weights": "models/r50_c4_1600.pth"}}}
    (tmp_path / "detectron2.yaml").write_text(yaml.safe_dump(override))
    result = run_snakemake(tmp_path, "results/features/coco.h5", "--cores", "2", "--configfile", TINY, str(tmp_path / "detectron2.yaml"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    reader = FeatureReader(tmp_path / "results" / "features" / "coco.h5")
    provenance = reader.provenance
    assert provenance["backend"] == "detectron2" and provenance["num_object_classes"] == 1600
    assert provenance["attributes"] is True and provenance["num_attribute_classes"] == 0  # the zoo model has no attribute head
    assert provenance["batch_size"] == 2 and reader.feature_dim == 2048
    tiny = yaml.safe_load(Path(TINY).read_text())
    minimum = tiny.get("regions", {}).get("selection", {}).get("min_boxes", 1)
    assert len(reader) > 0 and all(reader.get(i).num_boxes >= minimum for i in reader.ids[:10])
