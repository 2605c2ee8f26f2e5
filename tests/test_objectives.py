"""Tests of token/region masking and of the pre-training losses, on a real (small) SemVLP model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from semvlp.model import SemVLPConfig, SemVLPForPreTraining, box_geometry
from semvlp.objectives import IGNORE_INDEX, LOSS_NAMES, LossWeights, head_positions, mask_regions, mask_tokens, pretraining_losses
from semvlp.tokenization import load_tokenizer, train_wordpiece

torch.set_num_threads(1)

MASK_ID, VOCAB = 4, 1000


def token_batch(rows: int = 200, length: int = 256):
    """Ids in [5, VOCAB) with [CLS] first, [SEP] and padding at the end of every row."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (rows, length), generator=gen)
    special = torch.zeros(rows, length, dtype=torch.bool)
    special[:, 0] = special[:, -20:] = True
    ids[:, 0], ids[:, -20], ids[:, -19:] = 2, 3, 0
    return ids, special


def test_mask_tokens_rates_and_targets():
    ids, special = token_batch()
    masked_ids, labels = mask_tokens(
        ids, special, mask_token_id=MASK_ID, vocab_size=VOCAB, prob=0.15, generator=torch.Generator().manual_seed(1)
    )
    chosen = labels != IGNORE_INDEX
    assert torch.equal(labels[chosen], ids[chosen])  # the target is the original token
    assert not chosen[special].any()  # never [CLS], [SEP] or padding
    assert torch.equal(masked_ids[~chosen], ids[~chosen])  # nothing else changes
    assert chosen[~special].float().mean().item() == pytest.approx(0.15, abs=0.01)

    now = masked_ids[chosen]
    was = ids[chosen]
    share_mask = (now == MASK_ID).float().mean().item()
    share_random = ((now != MASK_ID) & (now != was)).float().mean().item()
    share_kept = (now == was).float().mean().item()
    assert share_mask == pytest.approx(0.8, abs=0.02)
    assert share_random == pytest.approx(0.1, abs=0.015)
    assert share_kept == pytest.approx(0.1, abs=0.015)
    random_ids = now[(now != MASK_ID) & (now != was)]
    assert random_ids.min() >= 0 and random_ids.max() < VOCAB and random_ids.unique().numel() > 100


def test_mask_tokens_is_reproducible_and_respects_prob():
    ids, special = token_batch(rows=20, length=64)
    run = lambda seed, prob=0.15: mask_tokens(  # noqa: E731
        ids, special, mask_token_id=MASK_ID, vocab_size=VOCAB, prob=prob, generator=torch.Generator().manual_seed(seed)
    )
    assert all(torch.equal(a, b) for a, b in zip(run(3), run(3)))
    assert not torch.equal(run(3)[1], run(4)[1])
    none_ids, none_labels = run(3, prob=0.0)
    assert torch.equal(none_ids, ids) and (none_labels == IGNORE_INDEX).all()
    all_labels = run(3, prob=1.0)[1]
    assert torch.equal(all_labels != IGNORE_INDEX, ~special)


def test_mask_tokens_with_a_real_tokenizer(tmp_path):
    train_wordpiece(["a small red circle", "a big blue square left of the circle"] * 5, 60, tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    batch = tokenizer(
        ["a red circle", "a big blue square left of a small circle"],
        padding=True,
        return_special_tokens_mask=True,
        return_tensors="pt",
    )
    special = batch["special_tokens_mask"].bool()
    assert special[0, -1] and batch["input_ids"][0, -1] == tokenizer.pad_token_id  # padding counts as special
    _, labels = mask_tokens(
        batch["input_ids"], special, mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer), prob=1.0
    )
    targets = labels[labels != IGNORE_INDEX]
    assert set(tokenizer.convert_ids_to_tokens(targets.tolist())) <= set(tokenizer.get_vocab()) - set(
        tokenizer.all_special_tokens
    )


def test_mask_regions_rate_and_padding():
    region_mask = torch.ones(500, 36, dtype=torch.bool)
    region_mask[:, 30:] = False
    masked = mask_regions(region_mask, prob=0.15, generator=torch.Generator().manual_seed(0))
    assert masked.dtype == torch.bool and masked.shape == region_mask.shape
    assert not masked[~region_mask].any()
    assert masked[region_mask].float().mean().item() == pytest.approx(0.15, abs=0.01)
    again = mask_regions(region_mask, prob=0.15, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masked, again)


# ---------------------------------------------------------------------------------- losses

CONFIG = SemVLPConfig(
    vocab_size=40,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    max_position_embeddings=16,
    region_feature_dim=10,
    cross_layers=1,
    num_object_labels=6,
    num_attribute_labels=4,
    num_answers=5,
)


def pretraining_batch(config: SemVLPConfig = CONFIG, batch: int = 4, text_len: int = 8, regions: int = 6) -> dict:
    """A real pre-training batch: masked text, masked regions, detector labels, ITM and QA labels."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, config.vocab_size, (batch, text_len), generator=gen)
    ids[:, 0], ids[:, -1] = 2, 3
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    masked_ids, mlm_labels = mask_tokens(
        ids, special, mask_token_id=4, vocab_size=config.vocab_size, prob=0.5, generator=gen
    )
    region_mask = torch.ones(batch, regions, dtype=torch.bool)
    region_mask[0, 4:] = False
    feats = torch.rand(batch, regions, config.region_feature_dim, generator=gen)
    masked_regions = mask_regions(region_mask, prob=0.5, generator=gen)
    boxes = torch.tensor([10.0, 20.0, 200.0, 150.0]).expand(batch, regions, 4)
    return dict(
        input_ids=masked_ids,
        text_mask=torch.ones_like(ids, dtype=torch.bool),
        region_feats=feats.masked_fill(masked_regions[..., None], 0.0),
        region_geom=box_geometry(boxes, 320, 240, dim=config.box_dim),
        region_mask=region_mask,
        mlm_labels=mlm_labels,
        masked_regions=masked_regions,
        target_feats=feats,
        obj_labels=torch.randint(0, config.num_object_labels, (batch, regions), generator=gen),
        obj_confs=torch.rand(batch, regions, generator=gen),
        attr_labels=torch.randint(0, max(config.num_attribute_labels, 1), (batch, regions), generator=gen),
        attr_confs=torch.rand(batch, regions, generator=gen),
        itm_labels=torch.tensor([1, 0, 1, 1]),
        qa_labels=torch.tensor([2, 3, -1, 0]),
    )


MODEL_INPUTS = ("input_ids", "text_mask", "region_feats", "region_geom", "region_mask")


def run_model(model: SemVLPForPreTraining, batch: dict, mode: str = "single"):
    return model(**{key: batch[key] for key in MODEL_INPUTS}, mode=mode)


@pytest.fixture(scope="module")
def model() -> SemVLPForPreTraining:
    torch.manual_seed(0)
    return SemVLPForPreTraining(CONFIG).eval()


def test_losses_match_their_definitions(model):
    batch = pretraining_batch()
    out = run_model(model, batch)
    losses = pretraining_losses(out, batch, LossWeights())
    assert set(losses) == set(LOSS_NAMES) | {"total"}

    labelled = batch["mlm_labels"] != IGNORE_INDEX
    assert labelled.any()
    torch.testing.assert_close(losses["mlm"], F.cross_entropy(out.mlm_logits[labelled], batch["mlm_labels"][labelled]))

    masked = batch["masked_regions"]
    assert masked.any()
    torch.testing.assert_close(
        losses["obj_feat"], F.smooth_l1_loss(out.obj_feat_pred[masked], batch["target_feats"][masked])
    )
    for term, logits, labels, confs in (
        ("obj_label", out.obj_logits, batch["obj_labels"], batch["obj_confs"]),
        ("attr_label", out.attr_logits, batch["attr_labels"], batch["attr_confs"]),
    ):
        per_region = F.cross_entropy(logits[masked], labels[masked], reduction="none") * confs[masked]
        torch.testing.assert_close(losses[term], per_region.mean())

    torch.testing.assert_close(losses["itm"], F.cross_entropy(out.itm_logits, batch["itm_labels"]))
    # QA counts matched examples with an answer only: examples 0 and 3 (1 is mismatched, 2 has none)
    answered = torch.tensor([0, 3])
    torch.testing.assert_close(losses["qa"], F.cross_entropy(out.qa_logits[answered], batch["qa_labels"][answered]))

    torch.testing.assert_close(losses["total"], sum(losses[name] for name in LOSS_NAMES))
    assert all(losses[name] > 0 for name in LOSS_NAMES)


def test_questions_without_a_matching_label_keep_their_answer_loss(model):
    # questions get no ITM label (pretrain.itm_sources) and are never given another image
    batch = pretraining_batch()
    batch["itm_labels"] = torch.tensor([-1, 0, -1, -1])
    out = run_model(model, batch)
    losses = pretraining_losses(out, batch, LossWeights())
    answered = torch.tensor([0, 3])
    torch.testing.assert_close(losses["qa"], F.cross_entropy(out.qa_logits[answered], batch["qa_labels"][answered]))


def test_total_follows_weights(model):
    batch = pretraining_batch()
    out = run_model(model, batch, mode="two")
    weights = LossWeights(mlm=2.0, obj_feat=0.5, obj_label=0.0, attr_label=1.0, itm=3.0, qa=0.0)
    losses = pretraining_losses(out, batch, weights)
    expected = sum(getattr(weights, name) * losses[name] for name in LOSS_NAMES)
    torch.testing.assert_close(losses["total"], expected)
    assert losses["obj_label"] > 0  # a zero weight drops the term from the total, not from the report


def test_confidence_weights_detector_labels(model):
    batch = pretraining_batch()
    out = run_model(model, batch)
    full = pretraining_losses(out, batch, LossWeights())
    halved = pretraining_losses(out, {**batch, "obj_confs": batch["obj_confs"] / 2}, LossWeights())
    torch.testing.assert_close(halved["obj_label"], full["obj_label"] / 2)
    torch.testing.assert_close(halved["attr_label"], full["attr_label"])


def test_unmasked_and_padded_regions_do_not_count(model):
    batch = pretraining_batch()
    out = run_model(model, batch)
    base = pretraining_losses(out, batch, LossWeights())
    other = dict(batch)
    unmasked = ~batch["masked_regions"]
    other["target_feats"] = batch["target_feats"] + unmasked[..., None] * 5.0
    shifted_labels = (batch["obj_labels"] + 1) % CONFIG.num_object_labels
    other["obj_labels"] = torch.where(unmasked, shifted_labels, batch["obj_labels"])
    # a padded region marked as masked must not count either
    other["masked_regions"] = batch["masked_regions"] | ~batch["region_mask"]
    changed = pretraining_losses(out, other, LossWeights())
    for name in ("obj_feat", "obj_label"):
        torch.testing.assert_close(changed[name], base[name])


def test_terms_without_targets_are_zero_not_nan(model):
    batch = pretraining_batch()
    batch.update(
        mlm_labels=torch.full_like(batch["mlm_labels"], IGNORE_INDEX),
        masked_regions=torch.zeros_like(batch["masked_regions"]),
        itm_labels=torch.full_like(batch["itm_labels"], -1),
        qa_labels=torch.full_like(batch["qa_labels"], -1),
    )
    model.zero_grad(set_to_none=True)
    out = run_model(model, batch)
    losses = pretraining_losses(out, batch, LossWeights())
    for name, value in losses.items():
        assert value.item() == 0.0, name
    losses["total"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_qa_only_on_matched_pairs(model):
    batch = pretraining_batch()
    batch["qa_labels"] = torch.tensor([-1, 3, -1, -1])  # the only answer belongs to a mismatched pair
    losses = pretraining_losses(run_model(model, batch), batch, LossWeights())
    assert losses["qa"].item() == 0.0


def test_heads_the_model_lacks_give_zero():
    config = dataclasses.replace(CONFIG, num_attribute_labels=0, num_answers=0)
    model = SemVLPForPreTraining(config).eval()
    batch = pretraining_batch(config)
    del batch["attr_labels"], batch["attr_confs"]
    losses = pretraining_losses(run_model(model, batch), batch, LossWeights())
    assert losses["attr_label"].item() == 0.0 and losses["qa"].item() == 0.0
    assert torch.isfinite(losses["total"]) and losses["total"] > 0
    with pytest.raises(KeyError, match="itm_labels"):
        without_itm = {key: value for key, value in batch.items() if key != "itm_labels"}
        pretraining_losses(run_model(model, batch), without_itm, LossWeights())


@pytest.mark.parametrize("mode", ["single", "two"])
def test_heads_at_masked_positions_only_give_the_same_losses_and_gradients(model, mode):
    batch = pretraining_batch()
    inputs = {key: batch[key] for key in MODEL_INPUTS}
    model.eval()  # no dropout: both passes must compute the same function
    results = []
    for positions in ({}, head_positions(batch)):
        model.zero_grad()
        losses = pretraining_losses(model(**inputs, mode=mode, **positions), batch, LossWeights())
        losses["total"].backward()
        results.append(({k: v.item() for k, v in losses.items()}, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (full, full_grads), (sparse, sparse_grads) = results
    assert full.keys() == sparse.keys()
    for name in full:
        assert sparse[name] == pytest.approx(full[name], rel=1e-5, abs=1e-6), name
    assert len(full_grads) == len(sparse_grads)
    for a, b in zip(full_grads, sparse_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_positions_that_leave_out_a_target_are_refused(model):
    batch = pretraining_batch()
    inputs = {key: batch[key] for key in MODEL_INPUTS}
    positions = head_positions(batch)
    positions["mlm_positions"] = torch.zeros_like(positions["mlm_positions"])  # no token, yet labels exist
    with pytest.raises(ValueError):
        pretraining_losses(model(**inputs, mode="single", **positions), batch, LossWeights())
