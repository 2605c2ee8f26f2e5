"""The embedded world generator: layout, determinism, and answers that follow from the pictures.

The checks re-derive every scene from the PNG pixels alone (connected blobs of each palette colour,
shape from the blob's outline) and re-evaluate captions, VQA/GQA answers and NLVR2 labels on those
parsed scenes with a small interpreter written here, independent of the generator's own logic.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from skimage.measure import label, regionprops

from semvlp.data.corpus import CorpusRecord, build_corpus, read_corpus, write_corpus
from semvlp.data.formats import load_coco_captions, load_coco_instances, load_flickr30k, load_gqa, load_nlvr2, load_vqa
from semvlp.data.world import (
    COLOUR_RGB, COLOURS, NLVR2_TEMPLATES, SHAPES, SIZES, WorldSpec, generate_world, nlvr2_statements, object_side,
)
from semvlp.errors import InputError
from semvlp.io import file_digest
from semvlp.metrics import normalize_vqa_answer

SMALL = WorldSpec(
    seed=3, coco_train=30, coco_val=8, gqa_train=30, gqa_val=8, nlvr2_train=48, nlvr2_dev=16,
    flickr_train=10, flickr_val=3, flickr_test=4, cc_rows=20, vqa_questions_per_image=5, gqa_questions_per_image=6,
    nlvr2_sentences_per_set=2, nlvr2_templates=NLVR2_TEMPLATES,  # every template, so every truth rule is checked
)
OFFICIAL_FILES = [
    "coco/annotations/instances_train2014.json", "coco/annotations/instances_val2014.json",
    "coco/annotations/captions_train2014.json", "coco/annotations/captions_val2014.json",
    "vqa/v2_OpenEnded_mscoco_train2014_questions.json", "vqa/v2_OpenEnded_mscoco_val2014_questions.json",
    "vqa/v2_mscoco_train2014_annotations.json", "vqa/v2_mscoco_val2014_annotations.json",
    "gqa/train_balanced_questions.json", "gqa/val_balanced_questions.json",
    "nlvr2/train.json", "nlvr2/dev.json", "flickr30k/dataset_flickr30k.json",
    "vg/region_descriptions.json", "vg/question_answers.json", "vg/image_data.json", "cc/Train_GCC-training.tsv",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world") / "embedded"
    generate_world(root, SMALL)
    return root


# ---------------------------------------------------------------------------------------------------
# A scene parser working from pixels only
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # x1, y1, x2 (exclusive), y2 (exclusive)


def _classify(mask: np.ndarray) -> str:
    """Shape of one blob from its fill ratio and its top/bottom row widths."""
    height, width = mask.shape
    fill = mask.sum() / (height * width)
    top, bottom = mask[0].sum() / width, mask[-1].sum() / width
    if fill > 0.95:
        return "square"
    if bottom > 0.9:
        return "triangle"
    if top < 0.15:
        return "diamond"
    return "circle" if fill > 0.7 else "cross"


def parse_picture(path: Path, image_size: int = 96) -> list[Seen]:
    pixels = np.asarray(Image.open(path).convert("RGB"))  # (H, W, 3)
    threshold = (object_side("small", image_size) + object_side("large", image_size)) / 2
    seen = []
    for colour, rgb in COLOUR_RGB.items():
        for blob in regionprops(label(np.all(pixels == rgb, axis=-1), connectivity=2)):
            y1, x1, y2, x2 = blob.bbox
            seen.append(Seen(_classify(blob.image), colour, "large" if x2 - x1 > threshold else "small", (x1, y1, x2, y2)))
    # Every pixel outside the objects has one and the same (background) colour.
    in_objects = np.zeros(pixels.shape[:2], dtype=bool)
    for rgb in COLOUR_RGB.values():
        in_objects |= np.all(pixels == rgb, axis=-1)
    assert len(np.unique(pixels[~in_objects], axis=0)) == 1, path
    return sorted(seen, key=lambda s: s.box)


# ---------------------------------------------------------------------------------------------------
# An interpreter of the generated language over parsed scenes
# ---------------------------------------------------------------------------------------------------

WORD_NUMBERS = {w: n for n, w in enumerate(["zero", "one", "two", "three", "four", "five", "six"])}
PLURALS = {"circles": "circle", "squares": "square", "triangles": "triangle", "diamonds": "diamond", "crosses": "cross"}
REL = r"(to the left of|to the right of|above|below)"


def holds(relation: str, a: Seen, b: Seen) -> bool:
    """a is entirely on that side of b."""
    return {
        "to the left of": a.box[2] <= b.box[0],
        "to the right of": a.box[0] >= b.box[2],
        "above": a.box[3] <= b.box[1],
        "below": a.box[1] >= b.box[3],
    }[relation]


def matching(phrase: str, scene: list[Seen]) -> list[Seen]:
    """Objects fitting 'small red circle' / 'red object' / 'shape' / 'blue square' ..."""
    *attributes, noun = phrase.split()
    noun = PLURALS.get(noun, noun)
    found = []
    for obj in scene:
        if noun in SHAPES and obj.shape != noun:
            continue
        if all(a == obj.colour or a == obj.size for a in attributes):
            found.append(obj)
    return found


def the(phrase: str, scene: list[Seen]) -> Seen:
    """The one object a definite description refers to (the generator promises uniqueness)."""
    found = matching(phrase, scene)
    assert len(found) == 1, f"'the {phrase}' fits {len(found)} objects"
    return found[0]


def yes_no(value: bool) -> str:
    return "yes" if value else "no"


def answer_question(question: str, scene: list[Seen]) -> str:
    """Answer a generated VQA or GQA question on a parsed scene."""
    rules = [
        (rf"What color is the shape {REL} the (.+)\?",
         lambda rel, ref: _only([o for o in scene if holds(rel, o, the(ref, scene))]).colour),
        (rf"What shape is {REL} the (.+)\?", lambda rel, ref: _only([o for o in scene if holds(rel, o, the(ref, scene))]).shape),
        (rf"Is there an? (\w+) shape {REL} the (.+)\?",
         lambda colour, rel, ref: yes_no(any(o.colour == colour and holds(rel, o, the(ref, scene)) for o in scene))),
        (r"Which shape is the (largest|smallest)\?", lambda word: _only(_sized(word, scene)).shape),
        (r"What color is the (largest|smallest) shape\?", lambda word: _only(_sized(word, scene)).colour),
        (r"What color is the (leftmost|rightmost) shape\?", lambda word: _extreme(word, scene).colour),
        (r"Are the (.+) and the (.+) the same (color|shape)\?", lambda a, b, what: yes_no(
            _attribute(the(a, scene), what) == _attribute(the(b, scene), what))),
        (r"Is there both an? (\w+ \w+) and an? (\w+ \w+)\?",
         lambda a, b: yes_no(bool(matching(a, scene)) and bool(matching(b, scene)))),
        (r"Is there an? (\w+ \w+) or an? (\w+ \w+)\?", lambda a, b: yes_no(bool(matching(a, scene) + matching(b, scene)))),
        (r"Is there an? (\w+ \w+)\?", lambda phrase: yes_no(bool(matching(phrase, scene)))),
        (r"Is the (.+) (small|large) or (small|large)\?", lambda ref, a, b: the(ref, scene).size),
        (r"Is the (.+) (\w+) or (\w+)\?", lambda ref, a, b: the(ref, scene).colour),
        (rf"Is the (.+) {REL} the (.+)\?", lambda a, rel, b: yes_no(holds(rel, the(a, scene), the(b, scene)))),
        (r"Is the (.+) (\w+)\?", lambda ref, colour: yes_no(the(ref, scene).colour == colour)),
        (r"What color is the (.+)\?", lambda ref: the(ref, scene).colour),
        (r"What shape is the (.+)\?", lambda ref: the(ref, scene).shape),
        (r"How many shapes are there\?", lambda: str(len(scene))),
        (r"How many (\w+ objects|\w+) are there\?", lambda phrase: str(len(matching(phrase, scene)))),
    ]
    for pattern, rule in rules:
        match = re.fullmatch(pattern, question)
        if match:
            return rule(*match.groups())
    raise AssertionError(f"no rule understands {question!r}")


def _only(objects: list[Seen]) -> Seen:
    assert len(objects) == 1, objects
    return objects[0]


def _sized(word: str, scene: list[Seen]) -> list[Seen]:
    return [o for o in scene if o.size == ("large" if word == "largest" else "small")]


def _extreme(word: str, scene: list[Seen]) -> Seen:
    relation = "to the left of" if word == "leftmost" else "to the right of"
    return _only([o for o in scene if all(holds(relation, o, other) for other in scene if other != o)])


def _attribute(obj: Seen, what: str) -> str:
    return obj.colour if what == "color" else obj.shape


def statement_truth(sentence: str, left: list[Seen], right: list[Seen]) -> bool:
    """Truth of a generated NLVR2 sentence about a (left, right) pair of parsed scenes."""
    side = {"left": left, "right": right}
    rules = [
        (r"Both images contain the same number of shapes\.", lambda: len(left) == len(right)),
        (r"The (left|right) image contains exactly (\w+) (\w+)\.",
         lambda s, n, noun: len(matching(noun, side[s])) == WORD_NUMBERS[n]),
        (r"There are exactly (\w+) shapes in the (left|right) image\.", lambda n, s: len(side[s]) == WORD_NUMBERS[n]),
        (r"The (left|right) image has more (.+) than the (left|right) image\.",
         lambda s, phrase, o: len(matching(phrase, side[s])) > len(matching(phrase, side[o]))),
        (r"There is an? (\w+ \w+) in the (left|right) image\.", lambda phrase, s: bool(matching(phrase, side[s]))),
        (rf"In the (left|right) image, an? (\w+) object is {REL} an? (\w+)\.", lambda s, colour, rel, shape: any(
            a != b and a.colour == colour and b.shape == shape and holds(rel, a, b) for a in side[s] for b in side[s]
        )),
        (r"Both images contain an? (.+)\.", lambda phrase: bool(matching(phrase, left)) and bool(matching(phrase, right))),
        (r"At least one image contains an? (.+)\.", lambda phrase: bool(matching(phrase, left) + matching(phrase, right))),
        (r"Neither image contains an? (.+)\.", lambda phrase: not (matching(phrase, left) + matching(phrase, right))),
    ]
    for pattern, rule in rules:
        match = re.fullmatch(pattern, sentence)
        if match:
            return rule(*match.groups())
    raise AssertionError(f"no rule understands {sentence!r}")


def caption_truth(caption: str, scene: list[Seen]) -> bool | None:
    """Truth of the captions with a checkable high-level claim (None for the others)."""
    match = re.fullmatch(rf"The (.+) is {REL} the (.+)\.", caption)
    if match:
        a, rel, b = match.groups()
        return holds(rel, the(a, scene), the(b, scene))
    match = re.fullmatch(r"The (.+) is (larger|smaller) than the (.+)\.", caption)
    if match:
        a, word, b = match.groups()
        sizes = (the(a, scene).size, the(b, scene).size)
        return sizes == (("large", "small") if word == "larger" else ("small", "large"))
    match = re.fullmatch(r"There (?:is|are) (\w+) (\w+) objects?\.", caption)
    if match:
        n, colour = match.groups()
        return len(matching(f"{colour} object", scene)) == WORD_NUMBERS[n]
    match = re.fullmatch(r"There is an? (\w+ \w+ \w+)\.", caption)
    if match:
        return bool(matching(match.group(1), scene))
    match = re.fullmatch(r"(\w+) shapes? on a light background\.", caption)
    if match:
        return len(scene) == WORD_NUMBERS[match.group(1).lower()]
    return None


# ---------------------------------------------------------------------------------------------------
# Layout, manifest, loaders
# ---------------------------------------------------------------------------------------------------


def test_layout_and_manifest(world):
    for name in OFFICIAL_FILES:
        assert (world / name).is_file(), name
    manifest = json.loads((world / "MANIFEST.json").read_text())
    assert manifest["spec"] == json.loads(json.dumps(asdict(SMALL)))
    assert manifest["vocab"] == {"shapes": list(SHAPES), "colours": list(COLOURS), "sizes": list(SIZES)}
    assert manifest["counts"]["coco"]["train2014"]["images"] == SMALL.coco_train
    assert manifest["counts"]["nlvr2"]["dev"]["examples"] == SMALL.nlvr2_dev
    # MANIFEST.json is the last file written.
    newest_other = max(p.stat().st_mtime_ns for p in world.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
    assert (world / "MANIFEST.json").stat().st_mtime_ns >= newest_other
    # No temporary folder is left beside the world.
    assert sorted(p.name for p in world.parent.iterdir()) == ["embedded"]


def test_coco_files_load_and_name_existing_images(world):
    for split, size in (("train2014", SMALL.coco_train), ("val2014", SMALL.coco_val)):
        instances = load_coco_instances(world / f"coco/annotations/instances_{split}.json")
        assert len(instances.images) == size
        assert instances.categories == {i + 1: s for i, s in enumerate(SHAPES)}
        assert list(instances.attributes.values()) == list(COLOURS + SIZES)
        for image in instances.images:
            assert image.img_id == Path(image.file_name).stem and image.img_id.startswith(f"COCO_{split}_")
            assert (world / "coco/images" / split / image.file_name).is_file()
            assert SMALL.min_objects <= len(image.objects) <= SMALL.max_objects
        captions = load_coco_captions(world / f"coco/annotations/captions_{split}.json")
        per_image = Counter(c.img_id for c in captions)
        assert set(per_image.values()) == {5} and set(per_image) == {i.img_id for i in instances.images}
        questions = load_vqa(world / f"vqa/v2_OpenEnded_mscoco_{split}_questions.json", world / f"vqa/v2_mscoco_{split}_annotations.json")
        assert Counter(q.img_id for q in questions) == {i.img_id: SMALL.vqa_questions_per_image for i in instances.images}
        assert all(len(q.answers) == 10 for q in questions)


def test_gqa_nlvr2_flickr_files_load(world):
    for split, size in (("train", SMALL.gqa_train), ("val", SMALL.gqa_val)):
        questions = load_gqa(world / f"gqa/{split}_balanced_questions.json")
        assert len({q.img_id for q in questions}) == size
        assert all((world / "gqa/images" / f"{q.img_id}.png").is_file() for q in questions)
        raw = json.loads((world / f"gqa/{split}_balanced_questions.json").read_text())
        entry = next(iter(raw.values()))
        assert set(entry) >= {"imageId", "question", "answer", "fullAnswer", "isBalanced", "groups", "types", "semantic", "annotations"}
        assert set(entry["types"]) == {"structural", "semantic", "detailed"}
    for split, size in (("train", SMALL.nlvr2_train), ("dev", SMALL.nlvr2_dev)):
        examples = load_nlvr2(world / f"nlvr2/{split}.json")
        assert len(examples) == size and all(e.label is not None for e in examples)
        for e in examples:
            assert (world / "nlvr2/images" / split / f"{e.left_img_id}.png").is_file()
            assert (world / "nlvr2/images" / split / f"{e.right_img_id}.png").is_file()
    path = world / "flickr30k/dataset_flickr30k.json"
    for split, size in (("train", SMALL.flickr_train), ("val", SMALL.flickr_val), ("test", SMALL.flickr_test)):
        images = load_flickr30k(path, split)
        assert len(images) == size
        for image in images:
            assert len(set(image.captions)) == 5
            assert (world / "flickr30k/images" / f"{image.img_id}.png").is_file()
    karpathy = json.loads(path.read_text())
    assert karpathy["dataset"] == "flickr30k"
    first = karpathy["images"][0]
    assert first["sentids"] == [s["sentid"] for s in first["sentences"]]
    assert first["sentences"][0]["tokens"] == re.findall(r"[a-z0-9]+", first["sentences"][0]["raw"].lower())


# ---------------------------------------------------------------------------------------------------
# The data follows from the pictures
# ---------------------------------------------------------------------------------------------------


def test_instances_describe_the_pixels(world):
    instances = load_coco_instances(world / "coco/annotations/instances_train2014.json")
    for image in instances.images:
        seen = parse_picture(world / "coco/images/train2014" / image.file_name)
        annotated = sorted(
            (
                Seen(
                    instances.categories[o.category_id],
                    *[instances.attributes[a] for a in o.attribute_ids],
                    tuple(int(v) for v in o.box),
                )
                for o in image.objects
            ),
            key=lambda s: s.box,
        )
        assert seen == annotated, image.img_id


def test_captions_are_true_and_cover_both_levels(world):
    captions = load_coco_captions(world / "coco/annotations/captions_train2014.json")
    scenes: dict[str, list[Seen]] = {}
    kinds = Counter()
    for caption in captions:
        if caption.img_id not in scenes:
            scenes[caption.img_id] = parse_picture(world / "coco/images/train2014" / f"{caption.img_id}.png")
        truth = caption_truth(caption.caption, scenes[caption.img_id])
        assert truth in (True, None), caption
        kinds["checked" if truth else "other"] += 1
        for kind, pattern in (("relation", REL), ("comparison", r"(larger|smaller) than"), ("count", r"\b(one|two|three|four|five)\b"),
                              ("low-level", r"(small|large) (red|green|blue|yellow|purple|orange) \w+")):
            kinds[kind] += bool(re.search(pattern, caption.caption))
    assert all(kinds[k] >= 10 for k in ("relation", "comparison", "count", "low-level")), kinds
    assert kinds["checked"] >= len(captions) // 2, kinds


def test_vqa_answers_follow_from_the_pictures(world):
    questions = load_vqa(world / "vqa/v2_OpenEnded_mscoco_train2014_questions.json", world / "vqa/v2_mscoco_train2014_annotations.json")
    scenes: dict[str, list[Seen]] = {}
    for q in questions:
        if q.img_id not in scenes:
            scenes[q.img_id] = parse_picture(world / "coco/images/train2014" / f"{q.img_id}.png")
        assert answer_question(q.question, scenes[q.img_id]) == q.multiple_choice_answer, q
    assert {q.answer_type for q in questions} == {"yes/no", "number", "other"}
    yes_no_answers = Counter(q.multiple_choice_answer for q in questions if q.answer_type == "yes/no")
    assert min(yes_no_answers.values()) >= 0.3 * sum(yes_no_answers.values()), yes_no_answers


def test_vqa_answers_have_variants_and_disagreement(world):
    questions = load_vqa(world / "vqa/v2_OpenEnded_mscoco_train2014_questions.json", world / "vqa/v2_mscoco_train2014_annotations.json")
    raw = json.loads((world / "vqa/v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    needs_normalising = disagreeing = 0
    for q, annotation in zip(questions, raw):
        normalised = [normalize_vqa_answer(a) for a in q.answers]
        # Released annotations keep their majority answer in normalised form.
        assert normalize_vqa_answer(q.multiple_choice_answer) == q.multiple_choice_answer
        assert Counter(normalised).most_common(1)[0][0] == q.multiple_choice_answer
        assert normalised.count(q.multiple_choice_answer) >= 7
        needs_normalising += any(a != n for a, n in zip(q.answers, normalised))
        disagreeing += len(set(normalised)) > 1
        assert [a["answer_id"] for a in annotation["answers"]] == list(range(1, 11))
        assert {a["answer_confidence"] for a in annotation["answers"]} <= {"yes", "maybe", "no"}
    assert needs_normalising >= 0.1 * len(questions)
    assert disagreeing >= 0.1 * len(questions)


def test_gqa_answers_follow_from_the_pictures(world):
    for split in ("train", "val"):
        questions = load_gqa(world / f"gqa/{split}_balanced_questions.json")
        for q in questions:
            scene = parse_picture(world / "gqa/images" / f"{q.img_id}.png")
            assert answer_question(q.question, scene) == q.answer, q
    raw = json.loads((world / "gqa/train_balanced_questions.json").read_text())
    structural = Counter(entry["types"]["structural"] for entry in raw.values())
    assert set(structural) == {"query", "verify", "logical", "choose", "compare"}, structural


def test_nlvr2_labels_follow_from_the_pictures(world):
    for split in ("train", "dev"):
        examples = load_nlvr2(world / f"nlvr2/{split}.json")
        for e in examples:
            left = parse_picture(world / "nlvr2/images" / split / f"{e.left_img_id}.png")
            right = parse_picture(world / "nlvr2/images" / split / f"{e.right_img_id}.png")
            assert statement_truth(e.sentence, left, right) == e.label, e
        # Roughly balanced labels, and each sentence is judged on several image pairs.
        assert 0.4 <= sum(e.label for e in examples) / len(examples) <= 0.6
        pairs_per_sentence = Counter(re.sub(r"^(\w+-\d+)-\d+-", r"\1--", e.identifier) for e in examples)
        assert min(pairs_per_sentence.values()) >= 2
        assert len({e.sentence for e in examples}) > 1


# ---------------------------------------------------------------------------------------------------
# Determinism and replacing an earlier world
# ---------------------------------------------------------------------------------------------------


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): file_digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


TINY = WorldSpec(seed=11, coco_train=4, coco_val=2, gqa_train=3, gqa_val=2, nlvr2_train=8, nlvr2_dev=8,
                 flickr_train=2, flickr_val=1, flickr_test=1, cc_rows=4)


def test_same_seed_same_bytes_other_seed_other_world(tmp_path):
    generate_world(tmp_path / "a", TINY)
    generate_world(tmp_path / "b", TINY)
    generate_world(tmp_path / "c", WorldSpec(**{**asdict(TINY), "seed": 12}))
    first, second, other = _digests(tmp_path / "a"), _digests(tmp_path / "b"), _digests(tmp_path / "c")
    assert first == second
    assert first.keys() == other.keys()
    changed = [name for name in first if first[name] != other[name] and name != "MANIFEST.json"]
    assert "coco/annotations/instances_train2014.json" in changed
    assert sum(name.endswith(".png") for name in changed) == sum(name.endswith(".png") for name in first)


def test_regenerating_replaces_the_old_world(tmp_path):
    root = tmp_path / "embedded"
    generate_world(root, WorldSpec(**{**asdict(TINY), "coco_train": 6}))
    (root / "MANIFEST.json").unlink()  # Snakemake removes the output before rerunning the job
    generate_world(root, TINY)
    assert len(list((root / "coco/images/train2014").iterdir())) == TINY.coco_train  # no stale images
    assert json.loads((root / "MANIFEST.json").read_text())["spec"] == json.loads(json.dumps(asdict(TINY)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embedded"]


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    root = tmp_path / "data"
    (root / "coco").mkdir(parents=True)
    (root / "coco" / "real_annotations.json").write_text("{}")
    with pytest.raises(InputError, match="refusing to replace it") as err:
        generate_world(root, TINY)
    assert str(root) in str(err.value)
    assert (root / "coco" / "real_annotations.json").read_text() == "{}"


def test_spec_checks():
    with pytest.raises(ValueError, match="min_objects"):
        generate_world(Path("/nonexistent/never-written"), WorldSpec(seed=0, min_objects=4, max_objects=3))
    with pytest.raises(ValueError, match="nlvr2_dev"):
        WorldSpec(seed=0, nlvr2_dev=0).check()
    with pytest.raises(ValueError, match=r"nlvr2_templates .*unknown: \['exists'\]"):
        WorldSpec(seed=0, nlvr2_templates=["exists", "both"]).check()
    with pytest.raises(ValueError, match=r"nlvr2_sentences_per_set must be in 1\.\.6 .*got 7"):
        WorldSpec(seed=0, nlvr2_templates=["neither"], nlvr2_sentences_per_set=7).check()


def test_every_nlvr2_template_has_statements_and_a_schema_entry():
    every = WorldSpec(seed=0, nlvr2_templates=NLVR2_TEMPLATES)
    assert {s.template for s in nlvr2_statements(every)} == set(NLVR2_TEMPLATES)
    schema = yaml.safe_load((Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    generate = schema["properties"]["data"]["properties"]["generate"]["properties"]
    assert generate["nlvr2_templates"]["items"]["enum"] == list(NLVR2_TEMPLATES)


def test_nlvr2_templates_choose_the_statements(tmp_path):
    spec = WorldSpec(**{**asdict(TINY), "nlvr2_templates": ["both", "neither"], "nlvr2_sentences_per_set": 3})
    assert {s.template for s in nlvr2_statements(spec)} == {"both", "neither"}
    generate_world(tmp_path / "embedded", spec)
    examples = load_nlvr2(tmp_path / "embedded/nlvr2/train.json")
    assert len(examples) == spec.nlvr2_train
    assert all(e.sentence.startswith(("Both images contain", "Neither image contains")) for e in examples)
    # A set is 4 image pairs, each sentence labelled on all of them: 8 examples = 2 sentences on 4 pairs.
    assert len({e.sentence for e in examples}) == 2 and len({e.left_img_id for e in examples}) == 4


# ---------------------------------------------------------------------------------------------------
# The pre-training corpus
# ---------------------------------------------------------------------------------------------------


def test_corpus_merges_captions_vqa_and_gqa(world, tmp_path):
    built = build_corpus(world, ["coco_captions", "vqa", "gqa"], min_answer_count=3)
    records, table = built.records, built.table
    by_source = Counter(r.source for r in records)
    assert by_source == built.by_source() == {
        "coco_captions": 5 * SMALL.coco_train,
        "vqa": SMALL.vqa_questions_per_image * SMALL.coco_train,
        "gqa": len(load_gqa(world / "gqa/train_balanced_questions.json")),
    }
    vqa = load_vqa(world / "vqa/v2_OpenEnded_mscoco_train2014_questions.json", world / "vqa/v2_mscoco_train2014_annotations.json")
    vqa_records = [r for r in records if r.source == "vqa"]
    assert [(r.img_id, r.sentence, r.answer) for r in vqa_records] == [(q.img_id, q.question, q.multiple_choice_answer) for q in vqa]
    assert all(r.img_set == "coco" and r.img_id.startswith("COCO_train2014_") for r in records if r.source != "gqa")
    assert all(r.img_set == "gqa" and (world / "gqa/images" / f"{r.img_id}.png").is_file() for r in records if r.source == "gqa")
    assert all(r.answer is None for r in records if r.source == "coco_captions")
    counts = Counter(r.answer for r in records if r.answer is not None)
    assert set(table.answers) == {a for a, n in counts.items() if n >= 3}
    assert [counts[a] for a in table.answers] == sorted((counts[a] for a in table.answers), reverse=True)

    write_corpus(records, table, tmp_path / "corpus.jsonl", tmp_path / "answers.json")
    corpus = read_corpus(tmp_path / "corpus.jsonl")  # columns, a record built when indexed
    assert list(corpus) == records and corpus[-1] == records[-1]
    assert corpus.images() == list(dict.fromkeys((r.img_set, r.img_id) for r in records))
    assert list(corpus.of_sources(["vqa"])) == vqa_records
    assert list(corpus.sentences()) == [r.sentence for r in records]
    only_gqa = build_corpus(world, ["gqa"], min_answer_count=1, gqa_splits=["val"])
    assert {r.source for r in only_gqa.records} == {"gqa"} and "yes" in only_gqa.table


def test_corpus_errors(world, tmp_path):
    with pytest.raises(InputError, match="file not found") as err:
        build_corpus(world, ["coco_captions", "vqa"], min_answer_count=1, coco_splits=["train2014", "test2015"])
    assert "captions_test2015.json" in str(err.value)
    with pytest.raises(ValueError, match="unknown corpus source 'vg'"):
        build_corpus(world, ["vg"], min_answer_count=1)
    path = tmp_path / "corpus.jsonl"
    good = json.dumps(asdict(CorpusRecord("coco", "COCO_train2014_000000000001", "A red circle.", None, "coco_captions")))
    path.write_text(good + "\n" + good.replace('"coco"', '"flickr30k"', 1) + "\n")
    with pytest.raises(InputError, match="line 2 has img_set 'flickr30k'") as err:
        read_corpus(path)
    assert str(path) in str(err.value)
    path.write_text(good + "\n{not json\n")
    with pytest.raises(InputError, match="line 2 is not valid JSON"):
        read_corpus(path)


# ---------------------------------------------------------------------------------------------------
# Time of the default sizes (printed, not asserted)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_sizes_generate_quickly(tmp_path):
    spec = WorldSpec(seed=0)
    start = time.perf_counter()
    manifest = generate_world(tmp_path / "embedded", spec)
    seconds = time.perf_counter() - start
    print(f"\ndefault world ({spec}) generated in {seconds:.1f} s")
    counts = manifest["counts"]
    assert counts["coco"]["train2014"]["images"] == 1000 and counts["nlvr2"]["train"]["examples"] == 1600
    assert 0.4 <= counts["nlvr2"]["train"]["true"] / 1600 <= 0.6
