"""The official data files a config needs under data.root, and the message that lists the missing ones
with where to get them (the Snakefile stops on it before any job). No job imports this module, so its
task and corpus imports put nothing into a rule's code fingerprint (semvlp.fingerprint)."""

from __future__ import annotations

from pathlib import Path

from semvlp.data import layout
from semvlp.data.corpus import corpus_source_files
from semvlp.tasks import TASKS

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
IMAGE_SOURCES = {s: f"{s}_images" for s in layout.IMAGE_SETS}


def required_files(config: dict) -> list[tuple[Path, str]]:
    """Every official data file or folder a config reads under data.root, with where to get it (the
    files the config names itself, such as model.init and detector weights: semvlp.config.path_problems)."""
    root = config["data"]["root"]
    needed: list[tuple[Path, str]] = []
    for source, paths in corpus_source_files(root, config["data"]["corpus"]["sources"]).items():
        hint = {"coco_captions": "coco_annotations", "vg_captions": "vg", "vg_qa": "vg"}.get(source, source)
        needed += [(path, f"{source}_images" if path.name == "images" else hint) for path in paths]
    for task, section in config["finetune"]["tasks"].items():
        spec = TASKS[task]
        for name, path in spec.files(root, section).items():
            if name == "held_out_images":  # the config names it: semvlp.config.path_problems
                continue
            needed.append((path, "vg" if name.startswith("vg_") else spec.data_source))
    regions = config["regions"]
    if regions["backend"] != "tsv":
        extracted = [*regions["image_sets"], *regions["features_from"]]  # the latter into another set's store
        needed += [(layout.image_dir(root, s), IMAGE_SOURCES[s]) for s in extracted]
    if regions["backend"] == "torchvision" and regions["torchvision"]["weights"] is None:
        needed.append((layout.coco_instances(root, "train2014"), "coco_annotations"))  # the detector trains on it
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
