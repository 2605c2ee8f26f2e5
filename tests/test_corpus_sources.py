"""The paper's further corpus sources (Visual Genome phrases and QAs, Conceptual Captions, SBU): their
loaders on hand-written fixtures and on the real excerpts in ../shared/realdata, the image naming of
web captions, the held-out evaluation images, and `semvlp data corpus`."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from semvlp.data import layout
from semvlp.data.corpus import build_corpus, held_out_files, held_out_images, read_corpus, web_image_keys
from semvlp.data.formats import load_cc_captions, load_sbu_captions, load_vg_images, load_vg_qa, load_vg_regions
from semvlp.data.world import CC_DEAD_URL_EVERY, GQA_IMAGE_ID_OFFSETS, WorldSpec, generate_world
from semvlp.errors import InputError
from semvlp.io import file_digest

from conftest import BIN, REPO

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
REALDATA = REPO.parent / "shared" / "realdata"
needs_realdata = pytest.mark.skipif(not REALDATA.is_dir(), reason="../shared/realdata is absent (a user's clone)")


def _fixture_root(tmp_path: Path, with_cc_images=range(4)) -> Path:
    """A data root in the official layout holding the hand-written fixtures (VG, CC, SBU, and the
    evaluation splits whose images are held out), with CC and SBU images named by img2dataset keys."""
    root = tmp_path / "root"
    for folder in ("vg", "cc", "sbu"):
        shutil.copytree(FIXTURES / folder, root / folder)
    for name, target in (("v2_OpenEnded_mscoco_val2014_questions.json", layout.vqa_questions(root, "val2014")),
                         ("val_balanced_questions.json", layout.gqa_questions(root, "val")),
                         ("dataset_flickr30k.json", layout.flickr30k_dataset(root))):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(FIXTURES / name, target)
    for row in with_cc_images:  # img2dataset's files output: shard folders, 9-digit keys
        _touch(layout.image_dir(root, "cc") / "00000" / f"{row:09d}.jpg")
    for row in range(3):  # flat is fine too
        _touch(layout.image_dir(root, "sbu") / f"{row:09d}.jpg")
    return root


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


# ---------------------------------------------------------------------------------------------------
# Loaders: exact values on the fixtures
# ---------------------------------------------------------------------------------------------------


def test_visual_genome_loaders():
    images_path = FIXTURES / "vg" / "image_data.json"
    images = load_vg_images(images_path)
    assert list(images) == [2354786, 10, 11, 12]
    assert (images[10].coco_id, images[11].flickr_id, images[2354786].coco_id) == (42, 1007129816, None)
    regions = load_vg_regions(FIXTURES / "vg" / "region_descriptions.json", images, images_path)
    assert [(r.img_id, r.region_id, r.phrase) for r in regions][:2] == [
        ("2354786", 1, "a man riding a horse"), ("2354786", 2, "green grass on the ground"),  # stripped
    ]
    assert regions[3].box == (7, 5, 19.5, 25)  # x, y, width, height -> xyxy
    qas = load_vg_qa(FIXTURES / "vg" / "question_answers.json", images, images_path)
    assert [(q.img_id, q.qa_id, q.answer) for q in qas] == [("2354786", 101, "A horse."), ("10", 102, "Red."),
                                                             ("12", 103, "Clouds."), ("12", 104, "One.")]


def test_visual_genome_v12_image_data_names_the_id_field_id(tmp_path):
    path = tmp_path / "image_data.json"
    path.write_text(json.dumps([{"id": 5, "coco_id": None, "flickr_id": 7, "url": "", "width": 1, "height": 1}]))
    assert load_vg_images(path)[5].flickr_id == 7


def test_web_caption_loaders():
    cc = load_cc_captions(FIXTURES / "cc" / "Train_GCC-training.tsv")
    assert [(c.row, c.caption) for c in cc][:2] == [(0, "a dog runs along the beach ."), (1, "actor attends the premiere")]
    assert cc[3].url == "http://example.com/d.jpg"
    sbu = load_sbu_captions(FIXTURES / "sbu" / "SBU_captioned_photo_dataset_captions.txt",
                            FIXTURES / "sbu" / "SBU_captioned_photo_dataset_urls.txt")
    assert [(s.row, s.caption) for s in sbu][-1] == (2, "My cat sleeping on the sofa")
    assert sbu[0].url.endswith("4385058960_b0f291553e.jpg")


# ---------------------------------------------------------------------------------------------------
# Malformed files: one line naming the file and the entry
# ---------------------------------------------------------------------------------------------------


def _vg_error(tmp_path: Path, name: str, mutate) -> str:
    folder = tmp_path / "vg"
    shutil.copytree(FIXTURES / "vg", folder)
    data = json.loads((folder / name).read_text())
    mutate(data)
    (folder / name).write_text(json.dumps(data))
    images = load_vg_images(folder / "image_data.json")
    loader = load_vg_regions if name == "region_descriptions.json" else load_vg_qa
    with pytest.raises(InputError) as err:
        loader(folder / name, images, folder / "image_data.json")
    message = str(err.value)
    assert "\n" not in message and str(folder / name) in message
    return message


def test_a_region_without_a_phrase_is_refused(tmp_path):
    message = _vg_error(tmp_path, "region_descriptions.json", lambda data: data[3]["regions"][1].pop("phrase"))
    assert "image entry 3 region 1 has no field 'phrase'" in message


def test_a_blank_phrase_is_refused(tmp_path):
    message = _vg_error(tmp_path, "region_descriptions.json", lambda data: data[0]["regions"][0].update(phrase="  "))
    assert "image entry 0 region 0 has an empty phrase" in message


def test_a_qa_without_an_answer_is_refused(tmp_path):
    message = _vg_error(tmp_path, "question_answers.json", lambda data: data[3]["qas"][0].pop("answer"))
    assert "image entry 3 qa 0 has no field 'answer'" in message


def test_an_image_missing_from_image_data_is_refused(tmp_path):
    message = _vg_error(tmp_path, "question_answers.json", lambda data: data[1].update(id=999))
    assert "image entry 1 names image id 999, which is not in" in message and "image_data.json" in message


@pytest.mark.parametrize("content, message", [
    ("a caption\thttp://x/a.jpg\na caption without its url\n", "line 2 has 0 tabs, expected caption<TAB>url"),
    ("a\tb\tc\n", "line 1 has 2 tabs"),
    ("\thttp://x/a.jpg\n", "line 1 has an empty caption"),
])
def test_a_malformed_tsv_row_is_refused(tmp_path, content, message):
    path = tmp_path / "Train_GCC-training.tsv"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as err:
        load_cc_captions(path)
    assert str(path) in str(err.value)


def test_sbu_files_must_align(tmp_path):
    captions, urls = tmp_path / "captions.txt", tmp_path / "urls.txt"
    captions.write_text("one\ntwo\n")
    urls.write_text("http://x/1.jpg\n")
    with pytest.raises(InputError, match="has 2 lines but .*urls.txt has 1; they must align"):
        load_sbu_captions(captions, urls)


# ---------------------------------------------------------------------------------------------------
# The corpus: image naming of web captions, held-out evaluation images
# ---------------------------------------------------------------------------------------------------


def test_web_captions_keep_the_lines_with_a_fetched_image(tmp_path):
    root = _fixture_root(tmp_path, with_cc_images=[0, 2, 3])  # line 1's URL is dead
    built = build_corpus(root, ["cc", "sbu"], min_answer_count=1)
    assert [(r.img_set, r.img_id, r.sentence) for r in built.records if r.source == "cc"] == [
        ("cc", "000000000", "a dog runs along the beach ."), ("cc", "000000002", "illustration of a cartoon cat"),
        ("cc", "000000003", "the view from the top of the mountain"),
    ]
    assert built.dropped["cc"] == {"held_out": 0, "no_image": 1}
    assert built.by_source() == {"cc": 3, "sbu": 3}


def test_web_image_keys_read_the_stem_as_the_line(tmp_path):
    _touch(tmp_path / "00000" / "000000007.jpg")
    _touch(tmp_path / "00001" / "0000012.JPG")  # fewer digits (fewer shards): the same convention
    _touch(tmp_path / "00000" / "000000007.json")  # img2dataset's metadata beside the image
    _touch(tmp_path / "00000" / "cover.jpg")
    assert web_image_keys(tmp_path) == {7: "000000007", 12: "0000012"}
    _touch(tmp_path / "00002" / "7.png")
    with pytest.raises(InputError, match="holds two images of line 7"):
        web_image_keys(tmp_path)


def test_a_missing_image_folder_is_refused(tmp_path):
    root = _fixture_root(tmp_path)
    shutil.rmtree(layout.image_dir(root, "cc"))
    with pytest.raises(InputError, match="image folder not found") as err:
        build_corpus(root, ["cc"], min_answer_count=1)
    assert str(layout.image_dir(root, "cc")) in str(err.value)


def test_evaluation_images_are_held_out_through_vg_coco_and_flickr_ids(tmp_path):
    root = _fixture_root(tmp_path)
    held_out = {"vqa": ["val2014"], "gqa": ["val"], "retrieval": ["test"]}
    images = held_out_images(held_out_files(root, held_out))
    assert images.coco == {"COCO_val2014_000000000042", "COCO_val2014_000000000073"}
    assert images.gqa == {"2354786", "n161313"} and images.flickr30k == {"1007129816"}

    built = build_corpus(root, ["vg_captions", "vg_qa"], min_answer_count=1, held_out=held_out)
    # image 2354786 is a GQA val image, 10 is COCO 42 (VQA val2014), 11 is Flickr 1007129816 (test)
    assert {r.img_id for r in built.records} == {"12"}
    assert built.dropped == {"vg_captions": {"held_out": 4, "no_image": 0}, "vg_qa": {"held_out": 2, "no_image": 0}}
    assert [(r.sentence, r.answer) for r in built.records if r.source == "vg_qa"] == [
        ("What is in the sky?", "clouds"), ("How many lamp posts are there?", "1"),  # the VQA normalisation
    ]
    everything = build_corpus(root, ["vg_captions", "vg_qa"], min_answer_count=1)
    assert everything.by_source() == {"vg_captions": 6, "vg_qa": 4}
    assert sum(n for lost in everything.dropped.values() for n in lost.values()) == 0


# ---------------------------------------------------------------------------------------------------
# The embedded stand-ins
# ---------------------------------------------------------------------------------------------------


def test_embedded_visual_genome_is_the_gqa_images_and_cc_has_dead_urls(tmp_path):
    spec = WorldSpec(seed=5, coco_train=2, coco_val=1, gqa_train=5, gqa_val=3, nlvr2_train=8, nlvr2_dev=8,
                     flickr_train=2, flickr_val=1, flickr_test=1, cc_rows=17)
    root = tmp_path / "world"
    manifest = generate_world(root, spec)
    gqa_images = sorted(layout.image_dir(root, "gqa").iterdir())
    assert [file_digest(p) for p in gqa_images] == [file_digest(layout.image_dir(root, "vg") / p.name) for p in gqa_images]
    images = load_vg_images(layout.vg_image_data(root))
    assert sorted(images) == sorted(int(p.stem) for p in gqa_images)
    regions = load_vg_regions(layout.vg_region_descriptions(root), images, layout.vg_image_data(root))
    assert {r.img_id for r in regions} == {p.stem for p in gqa_images}
    assert all(0 <= x1 < x2 <= spec.image_size and 0 <= y1 < y2 <= spec.image_size for x1, y1, x2, y2 in (r.box for r in regions))
    qas = load_vg_qa(layout.vg_question_answers(root), images, layout.vg_image_data(root))
    assert all(q.answer[0].isupper() and q.answer.endswith(".") for q in qas)  # VG's style: "Red."
    assert manifest["counts"]["vg"] == {"images": 8, "regions": len(regions), "qas": len(qas)}

    built = build_corpus(root, ["vg_captions", "cc"], min_answer_count=1, held_out={"gqa": ["val"]})
    val_ids = {str(GQA_IMAGE_ID_OFFSETS["val"] + i) for i in range(spec.gqa_val)}
    assert built.dropped["vg_captions"]["held_out"] == sum(r.img_id in val_ids for r in regions) > 0
    dead = len(range(CC_DEAD_URL_EVERY - 1, spec.cc_rows, CC_DEAD_URL_EVERY))
    assert built.dropped["cc"] == {"held_out": 0, "no_image": dead} and built.by_source()["cc"] == spec.cc_rows - dead


# ---------------------------------------------------------------------------------------------------
# Real public excerpts and the command line
# ---------------------------------------------------------------------------------------------------


def _real_root(tmp_path: Path) -> Path:
    """The real VG and CC excerpts under their official names; every CC line gets an (empty) image file,
    since the corpus builder only needs to know which were fetched."""
    root = tmp_path / "real"
    (root / "vg").mkdir(parents=True)
    for name in ("region_descriptions.json", "question_answers.json", "image_data.json"):
        (root / "vg" / name).symlink_to(REALDATA / "visual_genome" / name)
    (root / "cc").mkdir()
    (root / "cc" / "Train_GCC-training.tsv").symlink_to(REALDATA / "conceptual_captions" / "Validation_GCC-1.1.0-Validation.first3000.tsv")
    for row in range(3000):
        _touch(layout.image_dir(root, "cc") / f"{row // 10000:05d}" / f"{row:09d}.jpg")
    return root


@needs_realdata
def test_real_excerpts_load():
    vg = REALDATA / "visual_genome"
    images = load_vg_images(vg / "image_data.json")
    regions = load_vg_regions(vg / "region_descriptions.json", images, vg / "image_data.json")
    qas = load_vg_qa(vg / "question_answers.json", images, vg / "image_data.json")
    raw_regions = json.loads((vg / "region_descriptions.json").read_text())
    raw_qas = json.loads((vg / "question_answers.json").read_text())
    assert len(images) == 50 == len(raw_regions) == len(raw_qas)
    assert len(regions) == sum(len(e["regions"]) for e in raw_regions) == 4781
    assert len(qas) == sum(len(e["qas"]) for e in raw_qas) == 3393
    assert qas[0].answer == "Green." and regions[0].phrase == "the clock is green in colour"
    cc = load_cc_captions(REALDATA / "conceptual_captions" / "Validation_GCC-1.1.0-Validation.first3000.tsv")
    assert len(cc) == 3000 and all(c.url.startswith("http") for c in cc)


@needs_realdata
def test_corpus_command_on_the_real_excerpts(tmp_path):
    root = _real_root(tmp_path)
    out = tmp_path / "corpus" / "pretrain.jsonl"
    result = subprocess.run(
        [str(BIN / "semvlp"), "data", "corpus", str(root), str(out), "--sources", "vg_captions", "vg_qa", "cc",
         "--min-answer-count", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["by_source"] == {"vg_captions": 4781, "vg_qa": 3393, "cc": 3000}  # every phrase, QA and caption
    assert summary["records"] == 4781 + 3393 + 3000 and summary["qa_records"] == 3393
    corpus = read_corpus(out)
    assert len(corpus) == summary["records"] and corpus[0].sentence == "the clock is green in colour"
    answers = json.loads((out.parent / "answers.json").read_text())
    assert "green" in json.dumps(answers)  # "Green." normalised


def test_corpus_command_refuses_a_malformed_file_in_one_line(tmp_path):
    root = _fixture_root(tmp_path)
    data = json.loads(layout.vg_question_answers(root).read_text())
    del data[0]["qas"][0]["answer"]
    layout.vg_question_answers(root).write_text(json.dumps(data))
    result = subprocess.run(
        [str(BIN / "semvlp"), "data", "corpus", str(root), str(tmp_path / "out.jsonl"), "--sources", "vg_qa"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and not (tmp_path / "out.jsonl").exists()
    assert result.stderr.count("\n") == 1 and "question_answers.json" in result.stderr and "image entry 0 qa 0" in result.stderr
