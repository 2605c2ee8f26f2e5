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


def task_files(task: str, root: str | Path, train_split: str, eval_splits: list[str]) -> dict[str, Path]:
    """The files a fine-tuning task reads, by name: `{split}_questions`, `{split}_annotations`, ..."""
    splits = [train_split] + [s for s in eval_splits if s != train_split]
    if task == "vqa":
        return {
            **{f"{s}_questions": vqa_questions(root, s) for s in splits},
            **{f"{s}_annotations": vqa_annotations(root, s) for s in splits if s not in VQA_TEST_SPLITS},
        }
    if task == "gqa":
        return {f"{s}_questions": gqa_questions(root, s) for s in splits}
    if task == "nlvr2":
        return {f"{s}_data": nlvr2_data(root, s) for s in splits}
    if task == "retrieval":
        return {"dataset": flickr30k_dataset(root)}
    raise ValueError(f"unknown task {task!r}")


# Where each official file comes from, for the message that lists missing files.
SOURCES = {
    "coco_annotations": "COCO 2014 train/val annotations (cocodataset.org, annotations_trainval2014.zip)",
    "coco_images": "COCO 2014 train/val images (cocodataset.org, train2014.zip and val2014.zip)",
    "vqa": "VQA v2 questions and annotations (visualqa.org, 'Download')",
    "gqa": "GQA balanced questions (the GQA project page, questions1.2.zip)",
    "gqa_images": "GQA images (the GQA project page, images.zip)",
    "nlvr2": "NLVR2 jsonl files (the lil-lab/nlvr repository, nlvr2/data/)",
    "nlvr2_images": "NLVR2 images (by request from the NLVR2 authors; see the lil-lab/nlvr repository)",
    "flickr30k": "Karpathy's split dataset_flickr30k.json (Karpathy's neuraltalk caption data)",
    "flickr30k_images": "Flickr30K images (by request from the Flickr30K authors)",
    "vg": "Visual Genome v1.2/1.4 region_descriptions.json, question_answers.json, image_data.json (visualgenome.org)",
    "vg_images": "Visual Genome images (visualgenome.org, images.zip and images2.zip, merged into one folder)",
    "cc": "Conceptual Captions Train_GCC-training.tsv (ai.google.com/research/ConceptualCaptions)",
    "cc_images": "Conceptual Captions images, fetched by URL with img2dataset's default keys (README)",
    "sbu": "SBU Captions' caption and URL lists (the SBU Captioned Photo Dataset page)",
    "sbu_images": "SBU images, fetched by URL with img2dataset's default keys (README)",
}
TASK_SOURCES = {"vqa": "vqa", "gqa": "gqa", "nlvr2": "nlvr2", "retrieval": "flickr30k"}
IMAGE_SOURCES = {s: f"{s}_images" for s in IMAGE_SETS}


def required_files(config: dict) -> list[tuple[Path, str]]:
    """Every official data file or folder a config reads under data.root, with where to get it (the
    files the config names itself, such as model.init and detector weights: semvlp.config.path_problems)."""
    from semvlp.data.corpus import corpus_source_files  # corpus imports this module

    root = config["data"]["root"]
    needed: list[tuple[Path, str]] = []
    for source, paths in corpus_source_files(root, config["data"]["corpus"]["sources"]).items():
        hint = {"coco_captions": "coco_annotations", "vg_captions": "vg", "vg_qa": "vg"}.get(source, source)
        needed += [(path, f"{source}_images" if path.name == "images" else hint) for path in paths]
    for task, settings in config["finetune"]["tasks"].items():
        files = task_files(task, root, settings["train_split"], settings["eval_splits"])
        needed += [(path, TASK_SOURCES[task]) for path in files.values()]
    regions = config["regions"]
    if regions["backend"] != "tsv":
        extracted = [*regions["image_sets"], *regions["features_from"]]  # the latter into another set's store
        needed += [(image_dir(root, s), IMAGE_SOURCES[s]) for s in extracted]
    if regions["backend"] == "torchvision" and regions["torchvision"]["weights"] is None:
        needed.append((coco_instances(root, "train2014"), "coco_annotations"))  # the detector trains on it
    unique: dict[Path, str] = {}
    for path, hint in needed:
        unique.setdefault(Path(path), hint)
    return list(unique.items())


def missing_files_message(config: dict) -> str | None:
    """None when every required file exists; else one message listing what is missing and its source."""
    missing = [(path, hint) for path, hint in required_files(config) if not path.exists()]
    if not missing:
        return None
    lines = [f"{len(missing)} input file(s) missing under data.root={config['data']['root']!r} (nothing was run):"]
    lines += [f"  {path}    <- {SOURCES[hint]}" for path, hint in missing]
    lines.append("Put the official files there with their official names (README, 'Pointing it at real data').")
    return "\n".join(lines)
