"""Where the official files live under a data root (DEVELOPERS.md, "Data layout").

One place names every path, so the generator, the loaders' callers and the Snakemake rules agree.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SETS = ("coco", "gqa", "nlvr2", "flickr30k")
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
    return Path(root) / "gqa" / f"{split}_balanced_questions.json"


def nlvr2_data(root: str | Path, split: str) -> Path:
    return Path(root) / "nlvr2" / f"{split}.json"


def flickr30k_dataset(root: str | Path) -> Path:
    return Path(root) / "flickr30k" / "dataset_flickr30k.json"


def embedded_files(root: str | Path) -> list[Path]:
    """Every annotation file the embedded generator writes (images go under `image_dir`)."""
    files = []
    for split in EMBEDDED_SPLITS["coco"]:
        files += [coco_instances(root, split), coco_captions(root, split), vqa_questions(root, split), vqa_annotations(root, split)]
    files += [gqa_questions(root, split) for split in EMBEDDED_SPLITS["gqa"]]
    files += [nlvr2_data(root, split) for split in EMBEDDED_SPLITS["nlvr2"]]
    files.append(flickr30k_dataset(root))
    return files


def task_files(task: str, root: str | Path, train_split: str, eval_splits: list[str]) -> dict[str, Path]:
    """The files a fine-tuning task reads, by name: `{split}_questions`, `{split}_annotations`, ..."""
    splits = [train_split] + [s for s in eval_splits if s != train_split]
    if task == "vqa":
        return {
            **{f"{s}_questions": vqa_questions(root, s) for s in splits},
            **{f"{s}_annotations": vqa_annotations(root, s) for s in splits},
        }
    if task == "gqa":
        return {f"{s}_questions": gqa_questions(root, s) for s in splits}
    if task == "nlvr2":
        return {f"{s}_data": nlvr2_data(root, s) for s in splits}
    if task == "retrieval":
        return {"dataset": flickr30k_dataset(root)}
    raise ValueError(f"unknown task {task!r}")
