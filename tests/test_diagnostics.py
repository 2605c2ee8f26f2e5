"""The grounding diagnostic on a real model, real HDF5 features and a real WordPiece tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semvlp.batching import RegionBank
from semvlp.data.corpus import CorpusRecord
from semvlp.diagnostics import _other_images, grounding_report
from semvlp.features import FeatureWriter, RegionRecord
from semvlp.model import SemVLPConfig, SemVLPForPreTraining
from semvlp.tokenization import load_tokenizer, train_wordpiece

COLOURS = ["red", "green", "blue", "yellow"]


def write_store(path, num_images: int, same_regions: bool) -> None:
    rng = np.random.default_rng(0)
    shared = rng.standard_normal((3, 8)).astype(np.float32)
    with FeatureWriter(path, num_images=num_images, max_boxes=3, feature_dim=8, feature_dtype="float32", provenance={"backend": "test"}) as writer:
        for i in range(num_images):
            writer.write(
                i,
                RegionRecord(
                    img_id=f"img{i}", img_h=32, img_w=32,
                    boxes=np.array([[1, 1, 10, 10], [5, 5, 20, 20], [2, 8, 30, 31]], np.float32),
                    features=shared if same_regions else rng.standard_normal((3, 8)).astype(np.float32),
                    obj_ids=np.ones(3, np.int64), obj_confs=np.ones(3, np.float32),
                    attr_ids=np.ones(3, np.int64), attr_confs=np.ones(3, np.float32),
                ),
            )


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("grounding")
    records = [CorpusRecord("coco", f"img{i}", f"a {COLOURS[i % 4]} square and a {COLOURS[(i + 1) % 4]} circle", None, "coco_captions") for i in range(12)]
    train_wordpiece([r.sentence for r in records], 80, root / "tokenizer")
    tokenizer = load_tokenizer(root / "tokenizer")
    for name, same in (("distinct", False), ("same", True)):
        write_store(root / f"{name}.h5", 12, same_regions=same)
    torch.manual_seed(0)
    model = SemVLPForPreTraining(SemVLPConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
        region_feature_dim=8, box_dim=4, cross_layers=1, num_object_labels=2, num_attribute_labels=2,
        num_answers=0, pad_token_id=tokenizer.pad_token_id, dropout=0.0, initializer_range=0.5,
    ))
    return {"root": root, "records": records, "tokenizer": tokenizer, "model": model}


def report(parts, store: str, mode: str = "single"):
    bank = RegionBank({"coco": parts["root"] / f"{store}.h5"}, box_dim=4)
    return grounding_report(parts["model"], parts["records"], bank, parts["tokenizer"], mode=mode, pairs=12, mask_prob=0.3, seed=1)


@pytest.mark.parametrize("mode", ["single", "two"])
def test_swapping_identical_images_changes_nothing(parts, mode):
    result = report(parts, "same", mode)
    assert result.pairs == 12
    assert result.mlm_loss_own_image > 0
    assert result.mlm_image_gain == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("mode", ["single", "two"])
def test_a_model_reading_the_regions_shows_an_image_effect(parts, mode):
    # random weights: the masked-word predictions move with the regions, in either direction
    assert abs(report(parts, "distinct", mode).mlm_image_gain) > 1e-4


def test_matching_accuracy_counts_own_images_as_matches(parts):
    head = parts["model"].itm_head
    saved = head.weight.detach().clone(), head.bias.detach().clone()
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 1.0]))  # always "match": right on every own image only
    try:
        assert report(parts, "distinct").itm_accuracy == 0.5
    finally:
        with torch.no_grad():
            head.weight.copy_(saved[0])
            head.bias.copy_(saved[1])


def test_the_same_seed_scores_the_same_pairs(parts):
    assert report(parts, "distinct") == report(parts, "distinct")


def test_other_images_never_give_a_pair_its_own_image():
    keys = [("coco", "a"), ("coco", "a"), ("coco", "b"), ("gqa", "a")]
    others = _other_images(keys, torch.Generator().manual_seed(0))
    assert all(other != key for key, other in zip(keys, others))
    with pytest.raises(ValueError, match="two different images"):
        _other_images([("coco", "a"), ("coco", "a")], torch.Generator().manual_seed(0))
