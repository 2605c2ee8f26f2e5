"""Where the official files live under a data root (DEVELOPERS.md, "Data layout").

One place names every path, so the generator, the loaders' callers and the Snakemake rules agree.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SETS = ("coco", "gqa", "nlvr2", "flickr30k", "vg", "cc", "sbu")
# The image sets the embedded generator writes (no SBU stand-in).
EMBEDDED_IMAGE_SETS = ("coco", "gqa", "nlvr2", "flickr30k", "vg", "cc")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # the files of an image folder (any case)
# Splits the embedded world writes (the names the real data sets use).
EMBEDDED_SPLITS = {
    "coco": ("train2014", "val2014"),
    "gqa": ("train", "val"),
    "nlvr2": ("train", "dev"),
}


def image_dir(root: str | Path, image_set: str) -> Path:
    if image_set not in IMAGE_SETS:
        raise ValueError(f"unknown image set {image_set!r}; expected one of {IMAGE_SETS}")
    return Path(root) / image_set / "images"


def coco_instances(root: str | Path, split: str) -> Path:
    return Path(root) / "coco" / "annotations" / f"instances_{split}.json"


def coco_captions(root: str | Path, split: str) -> Path:
    return Path(root) / "coco" / "annotations" / f"captions_{split}.json"


def vqa_questions(root: str | Path, split: str) -> Path:
    return Path(root) / "vqa" / f"v2_OpenEnded_mscoco_{split}_questions.json"


def vqa_annotations(root: str | Path, split: str) -> Path:
    return Path(root) / "vqa" / f"v2_mscoco_{split}_annotations.json"


def gqa_questions(root: str | Path, split: str) -> Path:
    # the server's `submission` file holds every test question, not the balanced subset
    return Path(root) / "gqa" / (f"{split}_all_questions.json" if split == "submission" else f"{split}_balanced_questions.json")


def nlvr2_data(root: str | Path, split: str) -> Path:
    return Path(root) / "nlvr2" / f"{split}.json"


def flickr30k_dataset(root: str | Path) -> Path:
    return Path(root) / "flickr30k" / "dataset_flickr30k.json"


def vg_region_descriptions(root: str | Path) -> Path:
    return Path(root) / "vg" / "region_descriptions.json"


def vg_question_answers(root: str | Path) -> Path:
    return Path(root) / "vg" / "question_answers.json"


def vg_image_data(root: str | Path) -> Path:
    return Path(root) / "vg" / "image_data.json"


def cc_captions(root: str | Path) -> Path:
    return Path(root) / "cc" / "Train_GCC-training.tsv"


def sbu_captions(root: str | Path) -> Path:
    return Path(root) / "sbu" / "SBU_captioned_photo_dataset_captions.txt"


def sbu_urls(root: str | Path) -> Path:
    return Path(root) / "sbu" / "SBU_captioned_photo_dataset_urls.txt"


def embedded_files(root: str | Path) -> list[Path]:
    """Every annotation file the embedded generator writes (images go under `image_dir`)."""
    files = []
    for split in EMBEDDED_SPLITS["coco"]:
        files += [coco_instances(root, split), coco_captions(root, split), vqa_questions(root, split), vqa_annotations(root, split)]
    files += [gqa_questions(root, split) for split in EMBEDDED_SPLITS["gqa"]]
    files += [nlvr2_data(root, split) for split in EMBEDDED_SPLITS["nlvr2"]]
    files += [flickr30k_dataset(root), vg_region_descriptions(root), vg_question_answers(root), vg_image_data(root), cc_captions(root)]
    return files


# VQA's test splits (EvalAI's test-dev and test-std phases) come without annotations.
VQA_TEST_SPLITS = ("test-dev2015", "test2015")
