"""Seeded generator of the embedded image-text world, written in the real public formats.

A scene is a plain light background with a few non-overlapping objects; each object has a shape, a
colour, a size and a position. From the scenes the generator writes COCO instances and captions, VQA v2
questions and annotations, GQA balanced questions, NLVR2 jsonl and the Flickr30K Karpathy file, laid out
as DEVELOPERS.md ("Data layout") says, with PNG images. Every answer, label and caption follows from the
scene, so every task has a real learning signal:

* captions carry low-level semantics ("a small red circle") and high-level semantics (relations,
  counts, size comparisons);
* VQA questions ask for colours, shapes, counts and yes/no facts, with ten annotator answers that mostly
  agree but include surface variants ("Two", "the red") and some disagreement;
* GQA questions are compositional (relations, superlatives, comparisons, logic) with exact answers;
* NLVR2 statements about two images are labelled by evaluating them on both scenes.

Each image (and each NLVR2 set) draws from its own random stream seeded by (seed, image set, split,
index): the same seed gives byte-identical files, and changing one size leaves other images unchanged.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
from PIL import Image, ImageDraw

from semvlp.data import layout
from semvlp.errors import InputError
from semvlp.io import write_json, write_text
from semvlp.metrics import normalize_vqa_answer

# ---------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")

# Every colour has a channel <= 60 and the background has all channels >= 225, so the two never meet.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 20),
    "purple": (140, 50, 180),
    "orange": (240, 130, 20),
}
# Object side as a share of the image side.
SIZE_FRACTION = {"small": 0.15, "large": 0.27}

# COCO ids: categories are the shapes, attributes are the colours then the sizes (both counted from 1).
CATEGORY_IDS = {shape: i + 1 for i, shape in enumerate(SHAPES)}
ATTRIBUTE_IDS = {name: i + 1 for i, name in enumerate(COLOURS + SIZES)}

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# NLVR2: each set has this many image pairs, and each of its sentences is labelled on every pair.
NLVR2_PAIRS_PER_SET = 4
# Statement templates (see `nlvr2_statements`). The default keeps the ones about what each image holds:
# with the counting and comparison templates mixed in, every pre-training variant stays at chance
# after fine-tuning on a few thousand statements (README, "NLVR2 in the embedded world").
NLVR2_TEMPLATES = ("existsIn", "relatedIn", "both", "either", "neither",
                   "exactlyShape", "exactlyTotal", "sameTotal", "moreShape", "moreColour", "moreLarge")
NLVR2_DEFAULT_TEMPLATES = ("existsIn", "relatedIn", "both", "either", "neither")

# VQA annotator noise: share of questions with some disagreeing annotators / with surface variants.
VQA_DISAGREEMENT_RATE = 0.3
VQA_VARIANT_RATE = 0.3
# At most this many of the 10 annotators disagree, and at most this many write a variant: the
# normalised majority answer is therefore always the true one.
VQA_MAX_NOISY_ANSWERS = 3
VQA_ANSWERS_PER_QUESTION = 10

# Id offsets keep the splits of one image set apart (and independent of the other split's size).
COCO_VAL_ID_OFFSET = 1_000_000
GQA_IMAGE_ID_OFFSETS = {"train": 2_000_000, "val": 3_000_000}
FLICKR_FILENAME_OFFSET = 1_000_000
COCO_SPLITS = {"train": "train2014", "val": "val2014"}

# Gap in pixels kept between objects and the border, so every object is its own connected blob.
_GAP = 2
_MAX_OBJECTS = 6


@dataclass
class WorldSpec:
    """What to generate. Sizes are numbers of images, except NLVR2 (numbers of examples)."""

    seed: int
    image_size: int = 96
    min_objects: int = 2
    max_objects: int = 5
    coco_train: int = 1000
    coco_val: int = 250
    gqa_train: int = 600
    gqa_val: int = 200
    nlvr2_train: int = 1600
    nlvr2_dev: int = 400
    flickr_train: int = 400
    flickr_val: int = 50
    flickr_test: int = 100
    cc_rows: int = 400  # Conceptual Captions lines; every CC_DEAD_URL_EVERY-th has no image, as a dead URL
    vqa_questions_per_image: int = 4
    gqa_questions_per_image: int = 4
    nlvr2_sentences_per_set: int = 4  # each labelled on the set's 4 image pairs
    nlvr2_templates: tuple[str, ...] = NLVR2_DEFAULT_TEMPLATES

    def __post_init__(self) -> None:
        self.nlvr2_templates = tuple(self.nlvr2_templates)  # a config gives a list

    def check(self) -> None:
        """Raise ValueError naming the field when the spec cannot be generated."""
        if self.image_size < 32:
            raise ValueError(f"image_size is {self.image_size}; objects need at least 32 pixels")
        if not 2 <= self.min_objects <= self.max_objects <= _MAX_OBJECTS:
            raise ValueError(
                f"need 2 <= min_objects <= max_objects <= {_MAX_OBJECTS} (relations need two objects, "
                f"and more than {_MAX_OBJECTS} large objects crowd the image); got "
                f"min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        for name in ("coco_train", "coco_val", "gqa_train", "gqa_val", "nlvr2_train", "nlvr2_dev",
                     "flickr_train", "flickr_val", "flickr_test", "cc_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 1 <= self.vqa_questions_per_image < 1000:
            raise ValueError("vqa_questions_per_image must be in 1..999 (question ids are image_id*1000 + k)")
        if not 1 <= self.gqa_questions_per_image < 100:
            raise ValueError("gqa_questions_per_image must be in 1..99 (question ids are imageId + two digits)")
        unknown = sorted(set(self.nlvr2_templates) - set(NLVR2_TEMPLATES))
        if unknown or not self.nlvr2_templates:
            raise ValueError(f"nlvr2_templates must be a non-empty subset of {list(NLVR2_TEMPLATES)}; unknown: {unknown}")
        available = len(nlvr2_statements(self))
        if not 1 <= self.nlvr2_sentences_per_set <= available:
            raise ValueError(
                f"nlvr2_sentences_per_set must be in 1..{available} (the statements of nlvr2_templates), "
                f"got {self.nlvr2_sentences_per_set}"
            )
        if max(self.coco_val, self.gqa_train, self.gqa_val) >= 1_000_000:
            raise ValueError("at most 999999 images per COCO val / GQA split (id offsets)")


# ---------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # (x1, y1, x2, y2) pixels, x2/y2 exclusive; always square

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]


def object_side(size: str, image_size: int) -> int:
    """Side in pixels of an object of `size` ("small"/"large") in an image of `image_size` pixels."""
    return max(4, round(SIZE_FRACTION[size] * image_size))


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """True when the boxes are separated by at least `_GAP` pixels along some axis."""
    return a[2] + _GAP <= b[0] or b[2] + _GAP <= a[0] or a[3] + _GAP <= b[1] or b[3] + _GAP <= a[1]


def _place(
    rng: random.Random, side: int, taken: list[tuple[int, int, int, int]], image_size: int
) -> tuple[int, int, int, int] | None:
    """A box of `side` pixels apart from every box in `taken`, or None after a fixed number of tries."""
    for _ in range(100):
        x = rng.randint(_GAP, image_size - side - _GAP)
        y = rng.randint(_GAP, image_size - side - _GAP)
        box = (x, y, x + side, y + side)
        if all(_apart(box, other) for other in taken):
            return box
    return None


def sample_scene(rng: random.Random, spec: WorldSpec) -> Scene:
    """A random scene of min_objects..max_objects non-overlapping objects on a light background."""
    background = (rng.randint(225, 250), rng.randint(225, 250), rng.randint(225, 250))
    count = rng.randint(spec.min_objects, spec.max_objects)
    while True:  # a crowded draw that leaves no room is redrawn from scratch
        objects: list[SceneObject] = []
        for _ in range(count):
            size = rng.choice(SIZES)
            box = _place(rng, object_side(size, spec.image_size), [o.box for o in objects], spec.image_size)
            if box is None:
                break
            objects.append(SceneObject(rng.choice(SHAPES), rng.choice(COLOURS), size, box))
        if len(objects) == count:
            return Scene(tuple(objects), background)


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    """Draw the scene without anti-aliasing: every object pixel has exactly its colour's RGB value."""
    image = Image.new("RGB", (image_size, image_size), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x1, y1, x2, y2 = obj.box
        last_x, last_y = x2 - 1, y2 - 1  # PIL's coordinates are inclusive
        middle_x, middle_y = (x1 + last_x) / 2, (y1 + last_y) / 2
        fill = COLOUR_RGB[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([x1, y1, last_x, last_y], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([x1, y1, last_x, last_y], fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(middle_x, y1), (last_x, last_y), (x1, last_y)], fill=fill)
        elif obj.shape == "diamond":
            draw.polygon([(middle_x, y1), (last_x, middle_y), (middle_x, last_y), (x1, middle_y)], fill=fill)
        elif obj.shape == "cross":
            side = x2 - x1
            arm = max(2, round(side / 3))
            offset = (side - arm) // 2
            draw.rectangle([x1 + offset, y1, x1 + offset + arm - 1, last_y], fill=fill)
            draw.rectangle([x1, y1 + offset, last_x, y1 + offset + arm - 1], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    return image


def _outline(obj: SceneObject) -> list[float]:
    """COCO polygon [x1, y1, x2, y2, ...] of the object's outline (circles as 16-gons)."""
    x1, y1, x2, y2 = obj.box
    mx, my = (x1 + x2) / 2, (y1 + y2) / 2
    if obj.shape == "circle":
        radius = (x2 - x1) / 2
        angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        points = [(mx + radius * np.cos(a), my + radius * np.sin(a)) for a in angles]
    elif obj.shape == "square":
        points = [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    elif obj.shape == "triangle":
        points = [(mx, y1), (x2, y2), (x1, y2)]
    elif obj.shape == "diamond":
        points = [(mx, y1), (x2, my), (mx, y2), (x1, my)]
    else:  # cross: the 12 corners of the plus sign
        side = x2 - x1
        arm = max(2, round(side / 3))
        a, b = x1 + (side - arm) // 2, x1 + (side - arm) // 2 + arm
        c, d = y1 + (side - arm) // 2, y1 + (side - arm) // 2 + arm
        points = [(a, y1), (b, y1), (b, c), (x2, c), (x2, d), (b, d), (b, y2), (a, y2), (a, d), (x1, d), (x1, c), (a, c)]
    return [round(float(v), 2) for point in points for v in point]


_Candidate = TypeVar("_Candidate")

# ---------------------------------------------------------------------------------------------------
# Language helpers
# ---------------------------------------------------------------------------------------------------

# relation -> (phrase, opposite relation)
RELATIONS = {
    "left": ("to the left of", "right"),
    "right": ("to the right of", "left"),
    "above": ("above", "below"),
    "below": ("below", "above"),
}


def relation_holds(relation: str, a: SceneObject, b: SceneObject) -> bool:
    """Whether `a` is entirely on that side of `b` (boxes do not overlap along that axis)."""
    if relation == "left":
        return a.box[2] <= b.box[0]
    if relation == "right":
        return a.box[0] >= b.box[2]
    if relation == "above":
        return a.box[3] <= b.box[1]
    if relation == "below":
        return a.box[1] >= b.box[3]
    raise ValueError(f"unknown relation {relation!r}")


def plural(noun: str) -> str:
    return noun + "es" if noun.endswith(("s", "x")) else noun + "s"


def counted(count: int, noun: str) -> str:
    """'one circle', 'three crosses'."""
    return f"{NUMBER_WORDS[count]} {noun if count == 1 else plural(noun)}"


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(obj: SceneObject) -> str:
    """Full description: 'small red circle'."""
    return f"{obj.size} {obj.colour} {obj.shape}"


# Attributes added to the noun, shortest first; word order is size before colour.
_REFERENCE_ATTRIBUTES = ((), ("colour",), ("size",), ("size", "colour"))


def reference(target: SceneObject, scene: Scene, name_shape: bool = True, exclude: tuple[str, ...] = ()) -> str | None:
    """Shortest description that fits `target` and no other object: 'circle', 'red circle', 'small object'.

    `name_shape=False` uses the noun 'object' (for questions that ask for the shape); attributes in
    `exclude` are never used (for questions that ask for them). None when no description is unique.
    """
    for attributes in _REFERENCE_ATTRIBUTES:
        if any(a in exclude for a in attributes) or (not name_shape and not attributes):
            continue
        matches = [
            o for o in scene.objects
            if all(getattr(o, a) == getattr(target, a) for a in attributes) and (not name_shape or o.shape == target.shape)
        ]
        if matches == [target]:
            return " ".join([getattr(target, a) for a in attributes] + [target.shape if name_shape else "object"])
    return None


def _count(scene: Scene, **attributes: str) -> int:
    return sum(all(getattr(o, k) == v for k, v in attributes.items()) for o in scene.objects)


def _pick_by_answer(rng: random.Random, candidates: list[_Candidate], answer_of: Callable[[_Candidate], str]) -> _Candidate:
    """A candidate whose answer is drawn uniformly among the answers present: flattens answer priors."""
    answers = sorted({answer_of(c) for c in candidates})
    chosen = rng.choice(answers)
    return rng.choice([c for c in candidates if answer_of(c) == chosen])


# ---------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------

CAPTIONS_PER_IMAGE = 5


def _caption_pool(scene: Scene) -> dict[str, list[str]]:
    """Candidate captions by level: objects (low level), counts, relations, comparisons (high level)."""
    objects = sorted(scene.objects, key=lambda o: o.centre)
    total = len(objects)
    groups = Counter(describe(o) for o in objects)  # keeps left-to-right order of first appearance
    listing = [article(d) if n == 1 else f"{NUMBER_WORDS[n]} {plural(d)}" for d, n in groups.items()]
    pool: dict[str, list[str]] = {
        "objects": [_sentence(_join(listing)) + ".", _sentence(_join(listing)) + " on a light background."]
        + [f"There is {article(describe(o))}." for o in objects],
        "counts": [f"{_sentence(counted(total, 'shape'))} on a light background.", f"An image with {counted(total, 'shape')}."],
        "relations": [],
        "comparisons": [],
    }
    for colour in COLOURS:
        n = _count(scene, colour=colour)
        if n:
            pool["counts"].append(f"There {'is' if n == 1 else 'are'} {counted(n, colour + ' object')}.")
    shape_counts = Counter(o.shape for o in objects)
    pool["counts"].append(_sentence(_join([counted(n, s) for s, n in shape_counts.most_common()])) + ".")
    small, large = _count(scene, size="small"), _count(scene, size="large")
    if small and large:
        pool["counts"].append(f"{_sentence(counted(large, 'large shape'))} and {counted(small, 'small shape')}.")

    full = {o: describe(o) for o in objects if groups[describe(o)] == 1}  # only unique descriptions refer
    for a in full:
        for b in full:
            if a is b:
                continue
            for relation, (phrase, _) in RELATIONS.items():
                if relation_holds(relation, a, b):
                    pool["relations"].append(f"The {full[a]} is {phrase} the {full[b]}.")
            if a.size == "large" and b.size == "small":
                pool["comparisons"].append(f"The {full[a]} is larger than the {full[b]}.")
                pool["comparisons"].append(f"The {full[b]} is smaller than the {full[a]}.")
    return pool


def scene_captions(scene: Scene, rng: random.Random) -> list[str]:
    """Five distinct captions: one from each level that has any, the rest from all levels."""
    pool = _caption_pool(scene)
    chosen = [rng.choice(candidates) for candidates in pool.values() if candidates]
    rest = sorted({c for candidates in pool.values() for c in candidates} - set(chosen))
    rng.shuffle(rest)
    chosen += rest[: CAPTIONS_PER_IMAGE - len(chosen)]
    if len(chosen) < CAPTIONS_PER_IMAGE:  # cannot happen with >= 2 objects; guard the invariant anyway
        raise RuntimeError(f"only {len(chosen)} distinct captions for scene {scene}")
    rng.shuffle(chosen)
    return chosen


def caption_tokens(caption: str) -> list[str]:
    """Karpathy-style tokens: lowercase words without punctuation."""
    return re.findall(r"[a-z0-9]+", caption.lower())


# ---------------------------------------------------------------------------------------------------
# VQA
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _VQACandidate:
    question: str
    answer: str  # normalised (the form released annotations use)
    question_type: str
    answer_type: str  # yes/no | number | other
    alternatives: tuple[str, ...]  # wrong answers a careless annotator could give


def _vqa_candidates(scene: Scene, rng: random.Random) -> dict[str, list[_VQACandidate]]:
    by_kind: dict[str, list[_VQACandidate]] = {k: [] for k in ("color", "shape", "count", "exists", "verify")}
    for obj in scene.objects:
        ref = reference(obj, scene, exclude=("colour",))
        if ref:
            others = tuple(c for c in COLOURS if c != obj.colour)
            by_kind["color"].append(_VQACandidate(f"What color is the {ref}?", obj.colour, "what color is the", "other", others))
            wrong = rng.choice(others)
            by_kind["verify"].append(_VQACandidate(f"Is the {ref} {obj.colour}?", "yes", "is the", "yes/no", ("no",)))
            by_kind["verify"].append(_VQACandidate(f"Is the {ref} {wrong}?", "no", "is the", "yes/no", ("yes",)))
        ref = reference(obj, scene, name_shape=False)
        if ref:
            others = tuple(s for s in SHAPES if s != obj.shape)
            by_kind["shape"].append(_VQACandidate(f"What shape is the {ref}?", obj.shape, "what shape is the", "other", others))

    def count_candidate(question: str, n: int) -> _VQACandidate:
        wrong = tuple(str(m) for m in (n - 1, n + 1) if m >= 0)
        return _VQACandidate(question, str(n), "how many", "number", wrong)

    for shape in SHAPES:
        by_kind["count"].append(count_candidate(f"How many {plural(shape)} are there?", _count(scene, shape=shape)))
    for colour in COLOURS:
        by_kind["count"].append(count_candidate(f"How many {colour} objects are there?", _count(scene, colour=colour)))
    by_kind["count"].append(count_candidate("How many shapes are there?", len(scene.objects)))
    present = {(o.colour, o.shape) for o in scene.objects}
    for colour in COLOURS:
        for shape in SHAPES:
            answer = "yes" if (colour, shape) in present else "no"
            by_kind["exists"].append(
                _VQACandidate(f"Is there {article(colour)} {shape}?", answer, "is there a", "yes/no", ("no" if answer == "yes" else "yes",))
            )
    return by_kind


def _answer_variants(answer: str, answer_type: str) -> list[str]:
    """Ways an annotator writes `answer` that normalise back to it ('Two', 'two.', 'the red', 'red ')."""
    if answer_type == "number":
        word = NUMBER_WORDS[int(answer)]
        return [word.capitalize(), f"{word}.", word, f"{answer} "]
    if answer_type == "yes/no":
        return [answer.capitalize(), f"{answer}.", f"{answer} "]
    return [answer.capitalize(), f"{answer}.", f"the {answer}", article(answer), f"{answer} "]


def _annotator_answers(candidate: _VQACandidate, rng: random.Random) -> list[dict]:
    """Ten annotator answers: the true answer, some written as variants, some replaced by a wrong one."""
    answers = [candidate.answer] * VQA_ANSWERS_PER_QUESTION
    confidences = ["yes"] * VQA_ANSWERS_PER_QUESTION
    slots = list(range(VQA_ANSWERS_PER_QUESTION))
    rng.shuffle(slots)
    disagreeing, varying = slots[:VQA_MAX_NOISY_ANSWERS], slots[VQA_MAX_NOISY_ANSWERS : 2 * VQA_MAX_NOISY_ANSWERS]
    if rng.random() < VQA_DISAGREEMENT_RATE:
        for slot in disagreeing[: rng.randint(1, VQA_MAX_NOISY_ANSWERS)]:
            answers[slot] = rng.choice(candidate.alternatives)
            confidences[slot] = rng.choice(("maybe", "no"))
    if rng.random() < VQA_VARIANT_RATE:
        variants = _answer_variants(candidate.answer, candidate.answer_type)
        for slot in varying[: rng.randint(1, VQA_MAX_NOISY_ANSWERS)]:
            answers[slot] = rng.choice(variants)
    for slot in slots[2 * VQA_MAX_NOISY_ANSWERS :]:
        if rng.random() < 0.1:
            confidences[slot] = "maybe"
    return [
        {"answer": answer, "answer_confidence": confidence, "answer_id": i + 1}
        for i, (answer, confidence) in enumerate(zip(answers, confidences))
    ]


def vqa_questions(scene: Scene, count: int, rng: random.Random) -> list[tuple[_VQACandidate, list[dict]]]:
    """Up to `count` distinct questions of mixed kinds, each with its ten annotator answers."""
    by_kind = _vqa_candidates(scene, rng)
    chosen: list[tuple[_VQACandidate, list[dict]]] = []
    asked: set[str] = set()
    while len(chosen) < count:
        kinds = [k for k, candidates in by_kind.items() if any(c.question not in asked for c in candidates)]
        if not kinds:
            break
        kind = rng.choice(kinds)
        fresh = [c for c in by_kind[kind] if c.question not in asked]
        candidate = _pick_by_answer(rng, fresh, lambda c: c.answer)
        asked.add(candidate.question)
        chosen.append((candidate, _annotator_answers(candidate, rng)))
    return chosen


def most_common_answer(answers: list[str]) -> str:
    """The most common normalised answer (first seen wins ties): VQA's `multiple_choice_answer`."""
    return Counter(normalize_vqa_answer(a) for a in answers).most_common(1)[0][0]


# ---------------------------------------------------------------------------------------------------
# GQA
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GQACandidate:
    question: str
    answer: str
    full_answer: str
    structural: str  # query | verify | logical | choose | compare
    semantic: str  # attr | rel | obj | cat
    detailed: str
    program: tuple[dict, ...]


def _select(obj_id: str, obj: SceneObject) -> dict:
    return {"operation": "select", "dependencies": [], "argument": f"{obj.shape} ({obj_id})"}


def _gqa_candidates(scene: Scene, object_ids: dict[SceneObject, str], rng: random.Random) -> dict[str, list[_GQACandidate]]:
    by_kind: dict[str, list[_GQACandidate]] = {
        k: [] for k in ("relQuery", "relVerify", "relExist", "superlative", "compare", "logical", "choose")
    }
    objects = scene.objects
    refs = {o: reference(o, scene) for o in objects}

    for anchor in objects:
        ref = refs[anchor]
        if not ref:
            continue
        for relation, (phrase, _) in RELATIONS.items():
            related = [o for o in objects if o is not anchor and relation_holds(relation, o, anchor)]
            relate = {"operation": "relate", "dependencies": [0], "argument": f"shape,{phrase},s"}
            if len(related) == 1:
                target = related[0]
                step = dict(relate, argument=f"{relate['argument']} ({object_ids[target]})")
                by_kind["relQuery"].append(_GQACandidate(
                    f"What color is the shape {phrase} the {ref}?", target.colour, f"The shape is {target.colour}.",
                    "query", "attr", "relColor",
                    (_select(object_ids[anchor], anchor), step, {"operation": "query", "dependencies": [1], "argument": "color"}),
                ))
                by_kind["relQuery"].append(_GQACandidate(
                    f"What shape is {phrase} the {ref}?", target.shape, f"It is {article(target.shape)}.",
                    "query", "rel", "relShape",
                    (_select(object_ids[anchor], anchor), step, {"operation": "query", "dependencies": [1], "argument": "name"}),
                ))
            related_colours = {o.colour for o in related}
            for colour in COLOURS:
                answer = "yes" if colour in related_colours else "no"
                by_kind["relExist"].append(_GQACandidate(
                    f"Is there {article(colour)} shape {phrase} the {ref}?", answer,
                    f"{answer.capitalize()}, there is {'a' if answer == 'yes' else 'no'} {colour} shape {phrase} the {ref}.",
                    "verify", "rel", "existRelColor",
                    (_select(object_ids[anchor], anchor), relate,
                     {"operation": "filter color", "dependencies": [1], "argument": colour},
                     {"operation": "exist", "dependencies": [2], "argument": ""}),
                ))
        for other in objects:
            if other is anchor or not refs[other]:
                continue
            holding = [r for r in RELATIONS if relation_holds(r, anchor, other)]
            true_relation = rng.choice(holding)  # non-overlapping boxes always hold at least one relation
            true_phrase = RELATIONS[true_relation][0]
            for relation, answer in ((true_relation, "yes"), (RELATIONS[true_relation][1], "no")):
                by_kind["relVerify"].append(_GQACandidate(
                    f"Is the {ref} {RELATIONS[relation][0]} the {refs[other]}?", answer,
                    f"{answer.capitalize()}, the {ref} is {true_phrase} the {refs[other]}.",
                    "verify", "rel", "relVerify",
                    (_select(object_ids[other], other), _select(object_ids[anchor], anchor),
                     {"operation": "verify rel", "dependencies": [0, 1], "argument": RELATIONS[relation][0]}),
                ))

    for size, word in (("large", "largest"), ("small", "smallest")):
        matching = [o for o in objects if o.size == size]
        if len(matching) == 1:
            target = matching[0]
            program = ({"operation": "select", "dependencies": [], "argument": "shape"},
                       {"operation": "choose size", "dependencies": [0], "argument": word})
            by_kind["superlative"].append(_GQACandidate(
                f"Which shape is the {word}?", target.shape, f"The {word} shape is {article(target.shape)}.",
                "query", "obj", "superlativeShape", program + ({"operation": "query", "dependencies": [1], "argument": "name"},)))
            by_kind["superlative"].append(_GQACandidate(
                f"What color is the {word} shape?", target.colour, f"The {word} shape is {target.colour}.",
                "query", "attr", "superlativeColor", program + ({"operation": "query", "dependencies": [1], "argument": "color"},)))
    for relation, word in (("left", "leftmost"), ("right", "rightmost")):
        extreme = [o for o in objects if all(relation_holds(relation, o, other) for other in objects if other is not o)]
        if len(extreme) == 1:
            target = extreme[0]
            by_kind["superlative"].append(_GQACandidate(
                f"What color is the {word} shape?", target.colour, f"The {word} shape is {target.colour}.",
                "query", "attr", "positionColor",
                ({"operation": "select", "dependencies": [], "argument": "shape"},
                 {"operation": "choose position", "dependencies": [0], "argument": word},
                 {"operation": "query", "dependencies": [1], "argument": "color"}),
            ))

    for attribute, noun_kwargs in (("colour", {"exclude": ("colour",)}), ("shape", {"name_shape": False})):
        word = "color" if attribute == "colour" else "shape"
        for i, a in enumerate(objects):
            for b in objects[i + 1:]:
                ref_a, ref_b = reference(a, scene, **noun_kwargs), reference(b, scene, **noun_kwargs)
                if not (ref_a and ref_b):
                    continue
                value_a, value_b = getattr(a, attribute), getattr(b, attribute)
                if attribute == "shape":
                    value_a, value_b = article(value_a), article(value_b)
                answer = "yes" if value_a == value_b else "no"
                full = (f"Yes, both are {value_a}." if answer == "yes"
                        else f"No, the {ref_a} is {value_a} and the {ref_b} is {value_b}.")
                by_kind["compare"].append(_GQACandidate(
                    f"Are the {ref_a} and the {ref_b} the same {word}?", answer, full, "compare", "attr", f"same{word.capitalize()}",
                    (_select(object_ids[a], a), _select(object_ids[b], b),
                     {"operation": f"same {word}", "dependencies": [0, 1], "argument": ""}),
                ))

    present = sorted({(o.colour, o.shape) for o in objects})
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    for _ in range(8):  # a handful of combinations; each side is present or absent with equal odds
        first, second = (rng.choice(present if rng.random() < 0.5 else absent) for _ in range(2))
        if first == second:
            continue
        yes_or = first in present or second in present
        yes_and = first in present and second in present
        phrase_1, phrase_2 = article(" ".join(first)), article(" ".join(second))
        exist_steps = ({"operation": "select", "dependencies": [], "argument": " ".join(first)},
                       {"operation": "exist", "dependencies": [0], "argument": ""},
                       {"operation": "select", "dependencies": [], "argument": " ".join(second)},
                       {"operation": "exist", "dependencies": [2], "argument": ""})
        by_kind["logical"].append(_GQACandidate(
            f"Is there {phrase_1} or {phrase_2}?", "yes" if yes_or else "no",
            "Yes, there is." if yes_or else f"No, there is neither {phrase_1} nor {phrase_2}.",
            "logical", "obj", "existOr", exist_steps + ({"operation": "or", "dependencies": [1, 3], "argument": ""},),
        ))
        by_kind["logical"].append(_GQACandidate(
            f"Is there both {phrase_1} and {phrase_2}?", "yes" if yes_and else "no",
            "Yes, there are both." if yes_and else "No, there are not both.",
            "logical", "obj", "existAnd", exist_steps + ({"operation": "and", "dependencies": [1, 3], "argument": ""},),
        ))

    for obj in objects:
        ref = reference(obj, scene, exclude=("colour",))
        if ref:
            wrong = rng.choice([c for c in COLOURS if c != obj.colour])
            first, second = rng.sample([obj.colour, wrong], 2)
            by_kind["choose"].append(_GQACandidate(
                f"Is the {ref} {first} or {second}?", obj.colour, f"The {ref} is {obj.colour}.", "choose", "attr", "chooseColor",
                (_select(object_ids[obj], obj), {"operation": "choose color", "dependencies": [0], "argument": f"{first}|{second}"}),
            ))
        ref = reference(obj, scene, exclude=("size",))
        if ref:
            by_kind["choose"].append(_GQACandidate(
                f"Is the {ref} small or large?", obj.size, f"The {ref} is {obj.size}.", "choose", "attr", "chooseSize",
                (_select(object_ids[obj], obj), {"operation": "choose size", "dependencies": [0], "argument": "small|large"}),
            ))
    return by_kind


def gqa_questions(scene: Scene, object_ids: dict[SceneObject, str], count: int, rng: random.Random) -> list[_GQACandidate]:
    """Up to `count` distinct compositional questions of mixed kinds with exact answers."""
    by_kind = _gqa_candidates(scene, object_ids, rng)
    chosen: list[_GQACandidate] = []
    asked: set[str] = set()
    while len(chosen) < count:
        kinds = [k for k, candidates in by_kind.items() if any(c.question not in asked for c in candidates)]
        if not kinds:
            break
        fresh = [c for c in by_kind[rng.choice(kinds)] if c.question not in asked]
        candidate = _pick_by_answer(rng, fresh, lambda c: c.answer)
        asked.add(candidate.question)
        chosen.append(candidate)
    return chosen


# ---------------------------------------------------------------------------------------------------
# NLVR2
# ---------------------------------------------------------------------------------------------------

Predicate = Callable[[Scene, Scene], bool]


@dataclass(frozen=True)
class _Statement:
    template: str
    sentence: str
    holds: Predicate  # (left scene, right scene) -> truth


def _side(side: str, left: Scene, right: Scene) -> Scene:
    return left if side == "left" else right


def _other(side: str) -> str:
    return "right" if side == "left" else "left"


def _exactly_shape(left, right, side, shape, n):
    return _count(_side(side, left, right), shape=shape) == n


def _exactly_total(left, right, side, n):
    return len(_side(side, left, right).objects) == n


def _more(left, right, side, **attributes):
    return _count(_side(side, left, right), **attributes) > _count(_side(_other(side), left, right), **attributes)


def _same_total(left, right):
    return len(left.objects) == len(right.objects)


def _exists_in(left, right, side, **attributes):
    return _count(_side(side, left, right), **attributes) > 0


def _both(left, right, **attributes):
    return _count(left, **attributes) > 0 and _count(right, **attributes) > 0


def _either(left, right, **attributes):
    return _count(left, **attributes) > 0 or _count(right, **attributes) > 0


def _neither(left, right, **attributes):
    return not _either(left, right, **attributes)


def _related_in(left, right, side, colour, relation, shape):
    scene = _side(side, left, right)
    return any(
        a is not b and a.colour == colour and b.shape == shape and relation_holds(relation, a, b)
        for a in scene.objects
        for b in scene.objects
    )


def nlvr2_statements(spec: WorldSpec) -> list[_Statement]:
    """Every statement of `spec.nlvr2_templates` the generator can write about a pair of images, with its
    truth function."""
    statements: list[_Statement] = []

    def add(template: str, sentence: str, holds: Predicate) -> None:
        statements.append(_Statement(template, sentence, holds))

    add("sameTotal", "Both images contain the same number of shapes.", _same_total)
    for side in ("left", "right"):
        other = _other(side)
        for shape in SHAPES:
            for n in (1, 2, 3):
                add("exactlyShape", f"The {side} image contains exactly {counted(n, shape)}.",
                    partial(_exactly_shape, side=side, shape=shape, n=n))
            add("moreShape", f"The {side} image has more {plural(shape)} than the {other} image.",
                partial(_more, side=side, shape=shape))
        for n in range(spec.min_objects, spec.max_objects + 1):
            add("exactlyTotal", f"There are exactly {NUMBER_WORDS[n]} shapes in the {side} image.",
                partial(_exactly_total, side=side, n=n))
        for colour in COLOURS:
            add("moreColour", f"The {side} image has more {colour} objects than the {other} image.",
                partial(_more, side=side, colour=colour))
            for shape in SHAPES:
                add("existsIn", f"There is {article(colour)} {shape} in the {side} image.",
                    partial(_exists_in, side=side, colour=colour, shape=shape))
            for relation, (phrase, _) in RELATIONS.items():
                for shape in SHAPES:
                    add("relatedIn", f"In the {side} image, {article(colour)} object is {phrase} {article(shape)}.",
                        partial(_related_in, side=side, colour=colour, relation=relation, shape=shape))
        add("moreLarge", f"The {side} image has more large shapes than the {other} image.",
            partial(_more, side=side, size="large"))
    for shape in SHAPES:
        add("both", f"Both images contain {article(shape)}.", partial(_both, shape=shape))
        for size in SIZES:
            add("either", f"At least one image contains {article(size + ' ' + shape)}.", partial(_either, size=size, shape=shape))
    for colour in COLOURS:
        add("neither", f"Neither image contains {article(colour)} object.", partial(_neither, colour=colour))
        add("both", f"Both images contain {article(colour)} object.", partial(_both, colour=colour))
    return [s for s in statements if s.template in spec.nlvr2_templates]


def choose_nlvr2_sentences(
    statements: list[_Statement], pairs: list[tuple[Scene, Scene]], count: int, rng: random.Random
) -> list[tuple[str, list[bool]]]:
    """`count` sentences for one set, with their labels on each pair, as balanced as possible.

    Statements whose True count is closest to half the pairs are preferred (so that the sentence alone
    never gives the label away); among those a template is drawn first, so no template dominates.
    """
    labelled = [(s, [s.holds(left, right) for left, right in pairs]) for s in statements]
    imbalance = {s.sentence: abs(2 * sum(labels) - len(labels)) for s, labels in labelled}
    chosen: list[tuple[str, list[bool]]] = []
    used: set[str] = set()
    while len(chosen) < count:
        fresh = [(s, labels) for s, labels in labelled if s.sentence not in used]
        best = min(imbalance[s.sentence] for s, _ in fresh)
        tier = [(s, labels) for s, labels in fresh if imbalance[s.sentence] == best]
        template = rng.choice(sorted({s.template for s, _ in tier}))
        statement, labels = rng.choice([(s, labels) for s, labels in tier if s.template == template])
        used.add(statement.sentence)
        chosen.append((statement.sentence, labels))
    return chosen


# ---------------------------------------------------------------------------------------------------
# Writers (one per image set); each returns its counts for the manifest
# ---------------------------------------------------------------------------------------------------


def _rng(spec: WorldSpec, *parts: object) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so streams are stable across processes.
    return random.Random(":".join(str(p) for p in (spec.seed, *parts)))


def _save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def _info(description: str) -> dict:
    return {"description": description, "version": "1.0", "year": 2014, "contributor": "semvlp embedded world generator"}


_LICENSE = {"id": 1, "name": "CC0 1.0 (generated data)", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}


def _write_coco(root: Path, spec: WorldSpec) -> dict:
    """COCO images, instances and captions, plus the VQA v2 files over the same images."""
    counts: dict = {}
    for split_name, split in COCO_SPLITS.items():
        size = spec.coco_train if split_name == "train" else spec.coco_val
        id_offset = 0 if split_name == "train" else COCO_VAL_ID_OFFSET
        images, instances, captions, questions, annotations = [], [], [], [], []
        for index in range(size):
            rng = _rng(spec, "coco", split, index)
            image_id = id_offset + index + 1
            file_name = f"COCO_{split}_{image_id:012d}.png"
            scene = sample_scene(rng, spec)
            picture = render_scene(scene, spec.image_size)
            _save_png(picture, layout.image_dir(root, "coco") / split / file_name)
            pixels = np.asarray(picture)  # (H, W, 3) uint8
            image_entry = {"id": image_id, "file_name": file_name, "width": spec.image_size,
                           "height": spec.image_size, "license": 1}
            images.append(image_entry)
            for k, obj in enumerate(scene.objects):
                x1, y1, x2, y2 = obj.box
                # Objects never touch, so the object's colour inside its box is exactly its mask.
                area = int(np.all(pixels[y1:y2, x1:x2] == COLOUR_RGB[obj.colour], axis=-1).sum())
                instances.append({
                    "id": image_id * 100 + k, "image_id": image_id, "category_id": CATEGORY_IDS[obj.shape],
                    "segmentation": [_outline(obj)], "area": area, "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "iscrowd": 0, "attribute_ids": [ATTRIBUTE_IDS[obj.colour], ATTRIBUTE_IDS[obj.size]],
                })
            for k, caption in enumerate(scene_captions(scene, rng)):
                captions.append({"id": image_id * 10 + k, "image_id": image_id, "caption": caption})
            for k, (candidate, answers) in enumerate(vqa_questions(scene, spec.vqa_questions_per_image, rng)):
                question_id = image_id * 1000 + k
                questions.append({"image_id": image_id, "question": candidate.question, "question_id": question_id})
                annotations.append({
                    "question_type": candidate.question_type,
                    "multiple_choice_answer": most_common_answer([a["answer"] for a in answers]),
                    "answers": answers, "image_id": image_id, "answer_type": candidate.answer_type,
                    "question_id": question_id,
                })
        write_json(layout.coco_instances(root, split), {
            "info": _info("Embedded world: COCO-format instances"), "licenses": [_LICENSE], "images": images,
            "annotations": instances,
            "categories": [{"id": CATEGORY_IDS[s], "name": s, "supercategory": "shape"} for s in SHAPES],
            "attributes": [{"id": ATTRIBUTE_IDS[a], "name": a} for a in COLOURS + SIZES],
        })
        write_json(layout.coco_captions(root, split), {
            "info": _info("Embedded world: COCO-format captions"), "licenses": [_LICENSE], "images": images,
            "annotations": captions,
        })
        vqa_license = {"name": "CC0 1.0 (generated data)", "url": _LICENSE["url"]}
        write_json(layout.vqa_questions(root, split), {
            "info": _info("Embedded world: VQA v2-format questions"), "task_type": "Open-Ended",
            "data_type": "mscoco", "data_subtype": split, "license": vqa_license, "questions": questions,
        })
        write_json(layout.vqa_annotations(root, split), {
            "info": _info("Embedded world: VQA v2-format annotations"), "license": vqa_license,
            "data_subtype": split, "annotations": annotations,
        })
        counts[split] = {"images": size, "objects": len(instances), "captions": len(captions), "vqa_questions": len(questions)}
    return counts


def _write_gqa(root: Path, spec: WorldSpec) -> dict:
    counts: dict = {}
    for split, size in (("train", spec.gqa_train), ("val", spec.gqa_val)):
        questions: dict[str, dict] = {}
        for index in range(size):
            rng = _rng(spec, "gqa", split, index)
            image_id = str(GQA_IMAGE_ID_OFFSETS[split] + index)
            scene = sample_scene(rng, spec)
            _save_png(render_scene(scene, spec.image_size), layout.image_dir(root, "gqa") / f"{image_id}.png")
            object_ids = {obj: f"{image_id}{k}" for k, obj in enumerate(scene.objects)}
            for k, q in enumerate(gqa_questions(scene, object_ids, spec.gqa_questions_per_image, rng)):
                questions[f"{image_id}{k:02d}"] = {
                    "semantic": [dict(step) for step in q.program], "entailed": [], "equivalent": [f"{image_id}{k:02d}"],
                    "question": q.question, "imageId": image_id, "isBalanced": True,
                    # Open questions group by what they ask for; yes/no questions have no global group.
                    "groups": {"global": q.detailed if q.structural in ("query", "choose") else None,
                               "local": f"{q.structural}-{q.detailed}"},
                    "answer": q.answer, "fullAnswer": q.full_answer,
                    "types": {"structural": q.structural, "semantic": q.semantic, "detailed": q.detailed},
                    "annotations": {"question": {}, "answer": {}, "fullAnswer": {}},
                }
        write_json(layout.gqa_questions(root, split), questions)
        counts[split] = {"images": size, "questions": len(questions)}
    return counts


def _write_nlvr2(root: Path, spec: WorldSpec) -> dict:
    statements = nlvr2_statements(spec)
    per_set = NLVR2_PAIRS_PER_SET * spec.nlvr2_sentences_per_set
    counts: dict = {}
    for split, size in (("train", spec.nlvr2_train), ("dev", spec.nlvr2_dev)):
        lines: list[str] = []
        examples: list[tuple[str, str, bool, str]] = []  # (identifier, sentence, label, pair stem)
        pairs_by_stem: dict[str, tuple[Scene, Scene]] = {}
        for set_index in range(-(-size // per_set)):
            rng = _rng(spec, "nlvr2", split, set_index)
            pairs = [(sample_scene(rng, spec), sample_scene(rng, spec)) for _ in range(NLVR2_PAIRS_PER_SET)]
            for sentence_index, (sentence, labels) in enumerate(choose_nlvr2_sentences(statements, pairs, spec.nlvr2_sentences_per_set, rng)):
                for pair_index, label in enumerate(labels):
                    stem = f"{split}-{set_index}-{pair_index}"
                    pairs_by_stem[stem] = pairs[pair_index]
                    examples.append((f"{stem}-{sentence_index}", sentence, label, stem))
        examples = examples[:size]  # the last set may be cut short to give exactly `size` examples
        written: set[str] = set()
        for identifier, sentence, label, stem in examples:
            if stem not in written:
                for side, scene in zip(("img0", "img1"), pairs_by_stem[stem]):
                    _save_png(render_scene(scene, spec.image_size), layout.image_dir(root, "nlvr2") / split / f"{stem}-{side}.png")
                written.add(stem)
            lines.append(_json_line({
                "validation": {}, "sentence": sentence, "left_url": f"images/{split}/{stem}-img0.png",
                "writer": "generator", "label": "True" if label else "False", "right_url": f"images/{split}/{stem}-img1.png",
                "synset": "shape", "query": f"shapes {stem.split('-')[1]}", "identifier": identifier, "extra_validations": {},
            }))
        write_text(layout.nlvr2_data(root, split), "".join(lines))
        counts[split] = {"examples": len(examples), "images": 2 * len(written), "true": sum(e[2] for e in examples)}
    return counts


VG_QUESTIONS_PER_IMAGE = 2
CC_DEAD_URL_EVERY = 8


def _write_vg(root: Path, spec: WorldSpec) -> dict:
    """Visual Genome stand-ins over the GQA images, as in the real data (GQA imageId = VG image_id):
    the same pictures under vg/images, a region phrase per object and per holding relation, and QAs
    answered VG-style ("Red.")."""
    images, regions, qas = [], [], []
    for split, size in (("train", spec.gqa_train), ("val", spec.gqa_val)):
        for index in range(size):
            image_id = GQA_IMAGE_ID_OFFSETS[split] + index
            scene = sample_scene(_rng(spec, "gqa", split, index), spec)  # the GQA image's own scene
            rng = _rng(spec, "vg", split, index)
            _save_png(render_scene(scene, spec.image_size), layout.image_dir(root, "vg") / f"{image_id}.png")
            images.append({"width": spec.image_size, "url": f"https://example.invalid/vg/{image_id}.png",
                           "height": spec.image_size, "image_id": image_id, "coco_id": None, "flickr_id": None})
            phrases = [(article(describe(obj)), obj.box) for obj in scene.objects]
            for a in scene.objects:
                for b in scene.objects:
                    relations = [r for r in RELATIONS if a is not b and relation_holds(r, a, b)]
                    if relations:
                        box = (min(a.box[0], b.box[0]), min(a.box[1], b.box[1]), max(a.box[2], b.box[2]), max(a.box[3], b.box[3]))
                        phrases.append((f"{article(describe(a))} {RELATIONS[rng.choice(relations)][0]} {article(describe(b))}", box))
            entry_regions = [
                {"region_id": image_id * 100 + k, "width": x2 - x1, "height": y2 - y1, "image_id": image_id,
                 "phrase": phrase, "y": y1, "x": x1}
                for k, (phrase, (x1, y1, x2, y2)) in enumerate(phrases)
            ]
            regions.append({"regions": entry_regions, "id": image_id})
            entry_qas = [
                {"a_objects": [], "question": candidate.question, "image_id": image_id, "qa_id": image_id * 100 + k,
                 "answer": _vg_answer(candidate.answer), "q_objects": []}
                for k, (candidate, _) in enumerate(vqa_questions(scene, VG_QUESTIONS_PER_IMAGE, rng))
            ]
            qas.append({"id": image_id, "qas": entry_qas})
    write_json(layout.vg_image_data(root), images)
    write_json(layout.vg_region_descriptions(root), regions)
    write_json(layout.vg_question_answers(root), qas)
    return {"images": len(images), "regions": sum(len(e["regions"]) for e in regions), "qas": sum(len(e["qas"]) for e in qas)}


def _vg_answer(answer: str) -> str:
    """VG's style: "Red.", "Two." (the VQA normalisation maps them back to "red", "2")."""
    return _sentence(NUMBER_WORDS[int(answer)] if answer.isdigit() else answer) + "."


def _write_cc(root: Path, spec: WorldSpec) -> dict:
    """A Conceptual Captions stand-in: `caption<TAB>url` lines, CC-style lowercase captions, and the
    images an img2dataset run would have fetched (key = line number, in shard folder 00000), save for
    every CC_DEAD_URL_EVERY-th line."""
    lines, fetched = [], 0
    for row in range(spec.cc_rows):
        rng = _rng(spec, "cc", row)
        scene = sample_scene(rng, spec)
        caption = rng.choice(scene_captions(scene, rng)).rstrip(".").lower()
        lines.append(f"{caption}\thttps://example.invalid/cc/{row}.png\n")
        if (row + 1) % CC_DEAD_URL_EVERY:
            _save_png(render_scene(scene, spec.image_size), layout.image_dir(root, "cc") / "00000" / f"{row:09d}.png")
            fetched += 1
    write_text(layout.cc_captions(root), "".join(lines))
    return {"rows": spec.cc_rows, "images": fetched}


def _json_line(entry: dict) -> str:
    return json.dumps(entry) + "\n"


def _write_flickr30k(root: Path, spec: WorldSpec) -> dict:
    entries = []
    sentence_id = 0
    for split, size in (("train", spec.flickr_train), ("val", spec.flickr_val), ("test", spec.flickr_test)):
        for index in range(size):
            rng = _rng(spec, "flickr30k", split, index)
            image_number = len(entries)
            filename = f"{FLICKR_FILENAME_OFFSET + image_number}.png"
            scene = sample_scene(rng, spec)
            _save_png(render_scene(scene, spec.image_size), layout.image_dir(root, "flickr30k") / filename)
            sentences = []
            for caption in scene_captions(scene, rng):
                sentences.append({"tokens": caption_tokens(caption), "raw": caption, "imgid": image_number, "sentid": sentence_id})
                sentence_id += 1
            entries.append({
                "sentids": [s["sentid"] for s in sentences], "imgid": image_number, "sentences": sentences,
                "split": split, "filename": filename,
            })
    write_json(layout.flickr30k_dataset(root), {"images": entries, "dataset": "flickr30k"})
    return {"train": spec.flickr_train, "val": spec.flickr_val, "test": spec.flickr_test}


# ---------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------

# Top-level entries of a generated world; a folder holding anything else is never replaced.
# MANIFEST.json.run_id: the MLflow run id the workflow writes next to the manifest (semvlp.jobs).
_WORLD_ENTRIES = {"coco", "vqa", "gqa", "nlvr2", "flickr30k", "vg", "cc", "MANIFEST.json", "MANIFEST.json.run_id", ".semvlp-world"}
_MARKER = ".semvlp-world"


def generate_world(root: str | Path, spec: WorldSpec) -> dict:
    """Write the whole embedded world under `root` and return its manifest.

    The world is built in a temporary sibling folder and swapped in at the end, so `root` is either
    the previous world or the complete new one, never a mix (stale images of a larger earlier world
    cannot survive). `MANIFEST.json` (spec, counts, vocabulary) is written last. An existing `root` is
    replaced only when it is empty or was written by this generator; anything else raises InputError.
    """
    spec.check()
    root = Path(root)
    _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{root.name}-", dir=root.parent))
    try:
        (staging / _MARKER).write_text("written by semvlp.data.world.generate_world\n")
        counts = {
            "coco": _write_coco(staging, spec),
            "gqa": _write_gqa(staging, spec),
            "nlvr2": _write_nlvr2(staging, spec),
            "flickr30k": _write_flickr30k(staging, spec),
            "vg": _write_vg(staging, spec),
            "cc": _write_cc(staging, spec),
        }
        manifest = {
            "generator": "semvlp.data.world",
            "spec": asdict(spec),
            "counts": counts,
            "vocab": {"shapes": list(SHAPES), "colours": list(COLOURS), "sizes": list(SIZES)},
        }
        write_json(staging / "MANIFEST.json", manifest, indent=1)
        _swap_in(staging, root)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return manifest


def _check_replaceable(root: Path) -> None:
    if not root.exists():
        return
    if not root.is_dir():
        raise InputError("exists and is not a folder; cannot generate the embedded world there", root)
    # Snakemake creates the (empty) parent folders of a rule's outputs before the job runs.
    if not any(p.is_file() for p in root.rglob("*")):
        return
    entries = {p.name for p in root.iterdir()}
    if _MARKER not in entries or not entries <= _WORLD_ENTRIES:
        raise InputError(
            "holds files the world generator did not write; refusing to replace it (point data.root at "
            "an empty or generated folder, or set data.generate: null to use the files there)",
            root,
        )


def _swap_in(staging: Path, root: Path) -> None:
    """Replace `root` by `staging` with renames (same parent folder, so each rename is atomic)."""
    if root.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{root.name}-", dir=root.parent))
        os.replace(root, old / root.name)
        os.replace(staging, root)
        shutil.rmtree(old)
    else:
        os.replace(staging, root)
