"""Does a pre-trained model ground sentences in regions? Two measurements on caption-image pairs.

A vision-language model can lower its masked-LM loss from text alone and keep its matching head at
chance for a long time, while its loss curves look healthy. These numbers tell the two apart:

* image dependence of the masked LM: the same masked captions are scored once with their own images and
  once with another image's regions; `mlm_image_gain` = loss(other image) - loss(own image). It is 0 for a
  model that ignores the regions and positive once the regions help predict the masked words.
* matching accuracy: the ITM head on the same pairs, own image = match, other image = mismatch (0.5 is
  chance).

Pairs are a fixed, seeded sample of the records, so two checkpoints are compared on the same pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from semvlp.batching import RegionBank, encode_text
from semvlp.data.corpus import CorpusRecord
from semvlp.model import SemVLPForPreTraining
from semvlp.objectives import mask_tokens


@dataclass
class GroundingReport:
    pairs: int  # caption-image pairs scored
    mlm_loss_own_image: float
    mlm_loss_other_image: float
    mlm_image_gain: float  # other - own: > 0 when the regions help predict masked words
    itm_accuracy: float  # own image = match, other image = mismatch; 0.5 = chance

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _other_images(keys: list[tuple[str, str]], generator: torch.Generator) -> list[tuple[str, str]]:
    """For each pair, the image of another pair that shows a different image (a derangement by image)."""
    others = []
    for i, key in enumerate(keys):
        for offset in torch.randperm(len(keys) - 1, generator=generator).tolist():
            candidate = keys[(i + 1 + offset) % len(keys)]
            if candidate != key:
                others.append(candidate)
                break
        else:
            raise ValueError("grounding needs pairs over at least two different images")
    return others


@torch.no_grad()
def grounding_report(
    model: SemVLPForPreTraining,
    records: Sequence[CorpusRecord],
    bank: RegionBank,
    tokenizer,
    *,
    mode: str,
    pairs: int = 256,
    mask_prob: float = 0.15,
    max_text_length: int = 24,
    seed: int = 0,
    batch_size: int = 128,
) -> GroundingReport:
    """Measure grounding on `pairs` records sampled with `seed` (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(records), generator=generator)[:pairs].tolist()
    sample = [records[i] for i in chosen]
    keys = [(r.img_set, r.img_id) for r in sample]
    other_keys = _other_images(keys, generator)

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = {"own": 0.0, "other": 0.0}
    masked_tokens = right = scored = 0
    for start in range(0, len(sample), batch_size):
        rows = slice(start, start + batch_size)
        text = encode_text(tokenizer, [r.sentence for r in sample[rows]], max_text_length)
        input_ids, labels = mask_tokens(
            text["input_ids"],
            text["special_tokens_mask"] | ~text["text_mask"],
            mask_token_id=tokenizer.mask_token_id,
            vocab_size=len(tokenizer),
            prob=mask_prob,
            generator=generator,
        )
        positions = labels >= 0  # [B, T]
        for name, image_keys, match in (("own", keys[rows], 1), ("other", other_keys[rows], 0)):
            regions = {k: v.to(device) for k, v in bank.batch(image_keys).items()}
            output = model(
                input_ids=input_ids.to(device),
                text_mask=text["text_mask"].to(device),
                region_feats=regions["region_feats"],
                region_geom=regions["region_geom"],
                region_mask=regions["region_mask"],
                mode=mode,
                mlm_positions=positions.to(device),
                object_positions=torch.zeros_like(regions["region_mask"]),
            )
            sums[name] += F.cross_entropy(output.mlm_logits.float(), labels[positions].to(device), reduction="sum").item()
            right += int((output.itm_logits.argmax(-1) == match).sum())
            scored += len(image_keys)
        masked_tokens += int(positions.sum())
    model.train(was_training)

    own, other = (sums[name] / max(masked_tokens, 1) for name in ("own", "other"))
    return GroundingReport(
        pairs=len(sample),
        mlm_loss_own_image=own,
        mlm_loss_other_image=other,
        mlm_image_gain=other - own,
        itm_accuracy=right / scored,
    )
