"""Pre-training: the initial checkpoint of a variant, and one phase (single, two or mixed mode).

A phase job starts from the previous phase's checkpoint and trains the shared stack in its mode with the
four objectives. Batches are a pure function of (seed, phase index, step): a phase killed mid-way
resumes from its last periodic checkpoint (`<output>.partial`) and ends exactly where an uninterrupted
run would (same seed, CPU). Each phase has its own optimiser and linear warm-up/decay schedule; the
weights carry over from phase to phase.

Distributed: under `torchrun` (WORLD_SIZE > 1) each process takes every world_size-th row of the same
global batch and DistributedDataParallel averages the gradients (gloo on CPU, NCCL on GPUs); rank 0
alone writes checkpoints and metrics. On a GPU the forward pass runs under bf16 autocast.
`python -m semvlp.pretrain ARGS.json` is the per-process entry point torchrun starts.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from semvlp.batching import RegionBank, encode_text, encoder_inputs
from semvlp.data.answers import AnswerTable
from semvlp.data.corpus import CORPUS_SOURCES, read_corpus
from semvlp.diagnostics import grounding_report
from semvlp.errors import InputError
from semvlp.io import atomic_path, write_json
from semvlp.model import SemVLPConfig, SemVLPForPreTraining, load_bert_checkpoint
from semvlp.objectives import LOSS_NAMES, LossWeights, head_positions, mask_regions, mask_tokens, pretraining_losses
from semvlp.tokenization import load_tokenizer

MODES = ("single", "two", "mixed")


def init_checkpoint(
    out_path: str | Path,
    *,
    model_settings: dict[str, Any],
    tokenizer_dir: str | Path,
    answers_path: str | Path,
    feature_paths: dict[str, str | Path],
    seed: int,
) -> dict[str, Any]:
    """Build the variant's model (from scratch or a local BERT checkpoint) and save it as phase 0."""
    tokenizer = load_tokenizer(tokenizer_dir)
    answers = AnswerTable.load(answers_path)
    bank = RegionBank(feature_paths, box_dim=model_settings["box_dim"])
    num_objects, num_attributes = bank.label_counts()
    sizes = dict(
        region_feature_dim=bank.feature_dim,
        box_dim=model_settings["box_dim"],
        cross_layers=model_settings["cross_layers"],
        num_object_labels=num_objects,
        num_attribute_labels=num_attributes,
        num_answers=len(answers),
        dropout=model_settings.get("dropout", 0.1),
    )
    torch.manual_seed(seed)
    init = model_settings["init"]
    if init == "scratch":
        config = SemVLPConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=model_settings["hidden_size"],
            num_layers=model_settings["num_layers"],
            num_heads=model_settings["num_heads"],
            intermediate_size=model_settings["intermediate_size"],
            max_position_embeddings=max(64, model_settings["max_text_length"]),
            pad_token_id=tokenizer.pad_token_id,
            type_vocab_size=model_settings.get("type_vocab_size", 0),
            init_scheme=model_settings.get("init_scheme", "pytorch"),
            **sizes,
        )
        model = SemVLPForPreTraining(config)
        report = {"init": "scratch"}
    else:
        config = SemVLPConfig.from_bert(init, **sizes)
        model = SemVLPForPreTraining(config)
        loaded = load_bert_checkpoint(model, init)
        report = {"init": str(init), "bert_loaded": len(loaded.loaded), "bert_fresh": len(loaded.fresh)}
    checkpoint = {
        "model_config": config.to_dict(),
        "model": model.state_dict(),
        "answers": list(answers.answers),
        "tokenizer": str(tokenizer_dir),
        "history": [],
    }
    with atomic_path(out_path) as tmp:
        torch.save(checkpoint, tmp)
    return {"parameters": sum(p.numel() for p in model.parameters()), **report}


def load_model(checkpoint_path: str | Path) -> tuple[SemVLPForPreTraining, dict[str, Any]]:
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    model = SemVLPForPreTraining(SemVLPConfig.from_dict(checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    return model, checkpoint


@dataclass
class PhaseSettings:
    mode: str
    index: int  # position of the phase in its variant's schedule (1-based)
    steps: int
    batch_size: int
    lr: float
    warmup_ratio: float
    weight_decay: float
    checkpoint_every: int
    mixed_single_ratio: float
    text_mask_prob: float
    region_mask_prob: float
    itm_mismatch_ratio: float
    max_text_length: int
    seed: int
    loss_weights: dict[str, float] = field(default_factory=dict)
    # corpus sources whose sentences get an image-text matching label; a question does not describe
    # its image, so a mismatched image often fits it as well and its label would be noise
    itm_sources: tuple[str, ...] = ("coco_captions",)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown phase mode {self.mode!r}; expected one of {MODES}")
        self.itm_sources = tuple(self.itm_sources)  # from YAML/JSON lists; compared on resume
        unknown = [source for source in self.itm_sources if source not in CORPUS_SOURCES]
        if unknown:
            raise ValueError(f"unknown ITM source {unknown[0]!r}; expected some of {CORPUS_SOURCES}")


class PretrainBatches:
    """Builds the batch of a given step, deterministically from (seed, phase index, step)."""

    def __init__(self, records, answers: AnswerTable, bank: RegionBank, tokenizer, settings: PhaseSettings):
        self.records = records
        self.answers = answers
        self.bank = bank
        self.tokenizer = tokenizer
        self.settings = settings
        self.image_keys = sorted({(r.img_set, r.img_id) for r in records})

    def generator(self, step: int) -> torch.Generator:
        s = self.settings
        return torch.Generator().manual_seed(((s.seed * 1000 + s.index) * 1_000_003 + step) % (2**63))

    def mode(self, step: int) -> str:
        if self.settings.mode != "mixed":
            return self.settings.mode
        draw = torch.rand((), generator=self.generator(step)).item()
        return "single" if draw < self.settings.mixed_single_ratio else "two"

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        s, g = self.settings, self.generator(step)
        picks = torch.randint(len(self.records), (s.batch_size,), generator=g).tolist()
        records = [self.records[i] for i in picks]
        # image-text matching: replace the image of some pairs (of the ITM sources) by another image
        draws = (torch.rand(s.batch_size, generator=g) < s.itm_mismatch_ratio).tolist()
        matched_kind = [r.source in s.itm_sources for r in records]
        mismatch = [draw and kind for draw, kind in zip(draws, matched_kind)]
        keys = []
        for rec, swap in zip(records, mismatch):
            key = (rec.img_set, rec.img_id)
            while swap and key == (rec.img_set, rec.img_id):
                key = self.image_keys[torch.randint(len(self.image_keys), (1,), generator=g).item()]
            keys.append(key)
        batch = self.bank.batch(keys)
        text = encode_text(self.tokenizer, [r.sentence for r in records], s.max_text_length)
        input_ids, mlm_labels = mask_tokens(
            text["input_ids"],
            text["special_tokens_mask"] | ~text["text_mask"],
            mask_token_id=self.tokenizer.mask_token_id,
            vocab_size=len(self.tokenizer),
            prob=s.text_mask_prob,
            generator=g,
        )
        masked_regions = mask_regions(batch["region_mask"], prob=s.region_mask_prob, generator=g)
        target_feats = batch["region_feats"]
        batch["region_feats"] = target_feats.masked_fill(masked_regions.unsqueeze(-1), 0.0)
        itm = torch.tensor([(0 if swap else 1) if kind else -1 for swap, kind in zip(mismatch, matched_kind)])
        qa = torch.tensor(
            [
                self.answers.index.get(r.answer, -1) if (r.answer is not None and not swap) else -1
                for r, swap in zip(records, mismatch)
            ]
        )
        batch.update(
            input_ids=input_ids,  # [B, T]
            text_mask=text["text_mask"],  # [B, T]
            mlm_labels=mlm_labels,  # [B, T], -100 where not masked
            masked_regions=masked_regions,  # [B, K]
            target_feats=target_feats,  # [B, K, D]
            itm_labels=itm,  # [B], -1 for sentences of sources without ITM
            qa_labels=qa,  # [B], -1 where no QA target
        )
        return batch


def _schedule(optimizer, steps: int, warmup_ratio: float):
    warmup = max(1, int(steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _grounding(model, records, bank, tokenizer, settings: PhaseSettings) -> dict[str, float]:
    """grounding_{mode}_* of the phase's final model on a fixed sample of its ITM-source sentences
    (semvlp.diagnostics), in both modes: the weights are shared, so a phase of one mode can help or
    hurt the other, and alternating schedules are judged by that."""
    described = [r for r in records if r.source in settings.itm_sources]
    if len({(r.img_set, r.img_id) for r in described}) < 2:
        return {}
    values = {}
    for mode in ("single", "two"):
        # a phase without text masking still needs masked words to measure the image's effect
        report = grounding_report(
            model, described, bank, tokenizer, mode=mode, mask_prob=settings.text_mask_prob or 0.15,
            max_text_length=settings.max_text_length, seed=settings.seed,
        )
        values.update({f"grounding_{mode}_{k}": v for k, v in report.to_dict().items() if k != "pairs"})
    return values


def _mean_last(history: list[dict[str, Any]], n: int) -> dict[str, float]:
    """Mean of each loss and of the ITM accuracy over the last n steps that logged it."""
    names = sorted({k for h in history for k in h if k.startswith(("loss_", "itm_"))})
    means = {}
    for name in names:
        recent = [h[name] for h in history if name in h][-n:]
        means[f"mean_last{n}_{name}"] = sum(recent) / len(recent)
    return means


def _itm_counts(output, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(pairs the matching head gets right, pairs with an ITM label) of this batch."""
    labelled = batch["itm_labels"] >= 0
    right = output.itm_logits.detach().argmax(-1)[labelled] == batch["itm_labels"][labelled]
    return int(right.sum()), int(labelled.sum())


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state()}


def default_device() -> torch.device:
    """The GPU when the job has one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device):
    """bf16 autocast on a GPU; a no-op on the CPU, where training stays float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=default_device)

    @classmethod
    def from_env(cls) -> "Distributed":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(rank=torch.distributed.get_rank(), world_size=world_size, device=device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's rows of the global batch, on its device."""
        return {k: v[self.rank :: self.world_size].to(self.device) for k, v in batch.items()}

    def global_losses(self, losses: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], weights: LossWeights) -> dict[str, torch.Tensor]:
        """Rescale each rank's per-term means so that DDP's gradient average equals the gradient of the
        whole batch's means: a term is a mean over this rank's targets (masked tokens, masked regions,
        answered questions), whose counts differ between ranks."""
        if self.world_size == 1:
            return losses
        masked = (batch["masked_regions"] & batch["region_mask"]).sum()
        local = torch.stack(
            [
                (batch["mlm_labels"] >= 0).sum(),
                masked,
                masked,
                masked,
                (batch["itm_labels"] >= 0).sum(),
                ((batch["qa_labels"] >= 0) & (batch["itm_labels"] != 0)).sum(),
            ]
        ).double()
        total = local.clone()
        torch.distributed.all_reduce(total)
        factors = (local * self.world_size / total.clamp(min=1)).tolist()
        scaled = {name: losses[name] * factor for name, factor in zip(LOSS_NAMES, factors)}
        scaled["total"] = sum(getattr(weights, name) * scaled[name] for name in LOSS_NAMES)
        return scaled

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average logged values over the ranks (what one process on the whole batch would log)."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(list(values.values()), dtype=torch.float64)
        torch.distributed.all_reduce(tensor)
        return dict(zip(values, (tensor / self.world_size).tolist()))


def run_phase(
    *,
    previous_checkpoint: str | Path,
    out_checkpoint: str | Path,
    metrics_path: str | Path,
    corpus_path: str | Path,
    answers_path: str | Path,
    tokenizer_dir: str | Path,
    feature_paths: dict[str, str | Path],
    settings: PhaseSettings,
    job=None,
) -> dict[str, Any]:
    """Train one phase; returns its summary metrics (also written to metrics_path)."""
    dist = Distributed.from_env()
    if settings.batch_size % dist.world_size:
        raise ValueError(f"batch size {settings.batch_size} does not split over {dist.world_size} processes")
    model, checkpoint = load_model(previous_checkpoint)
    tokenizer = load_tokenizer(tokenizer_dir)
    answers = AnswerTable.load(answers_path)
    records = read_corpus(corpus_path)
    if not records:
        raise InputError("the pre-training corpus is empty", corpus_path)
    bank = RegionBank(feature_paths, box_dim=model.config.box_dim)
    bank.check_ids([(r.img_set, r.img_id) for r in records], corpus_path)
    batches = PretrainBatches(records, answers, bank, tokenizer, settings)
    weights = LossWeights(**settings.loss_weights)

    model.to(dist.device)
    # single-stream steps leave the cross-attention module unused
    trained = model if dist.world_size == 1 else torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = _schedule(optimizer, settings.steps, settings.warmup_ratio)
    partial = Path(f"{out_checkpoint}.partial")
    start, history = 0, []
    if partial.is_file():
        state = torch.load(partial, map_location="cpu", weights_only=False)
        if state["settings"] == asdict(settings) and state["previous"] == str(previous_checkpoint):
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"]["torch"])
            start, history = state["step"], state["history"]
            print(f"resuming phase {settings.index} ({settings.mode}) at step {start} from {partial}")

    model.train()
    tic = time.perf_counter()
    progress = tqdm(
        range(start, settings.steps), initial=start, total=settings.steps, desc=f"phase {settings.index} ({settings.mode})",
        mininterval=5, disable=not dist.is_main,
    )
    for step in progress:
        batch = dist.shard(batches(step))
        mode = batches.mode(step)
        # dropout draws from the global RNG: seed it per step so a resumed run repeats it exactly
        torch.manual_seed(batches.generator(step).initial_seed() + 1)
        step_tic = time.perf_counter()
        with autocast(dist.device):
            # the masked-LM and masked-object heads run only where the losses read them
            output = trained(**encoder_inputs(batch), mode=mode, **head_positions(batch))
            losses = dist.global_losses(pretraining_losses(output, batch, weights), batch, weights)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        right, labelled = _itm_counts(output, batch)
        values = dist.mean({**{f"loss_{k}": v.item() for k, v in losses.items()}, "itm_right": right, "itm_labelled": labelled})
        right, labelled = values.pop("itm_right"), values.pop("itm_labelled")
        if labelled:  # a ratio of rank means is the ratio of sums; 0.5 while nothing is grounded yet
            values["itm_accuracy"] = right / labelled
        if not math.isfinite(values["loss_total"]):
            raise FloatingPointError(f"phase {settings.index}: loss is {values['loss_total']} at step {step}")
        values["lr"] = scheduler.get_last_lr()[0]
        values["samples_per_s"] = settings.batch_size / (time.perf_counter() - step_tic)
        history.append({"step": step, "mode": mode, **values})
        if job is not None:
            job.log_metrics(values, step=step)
        progress.set_postfix(loss=f"{values['loss_total']:.3f}", refresh=False)  # tqdm prints every mininterval
        if dist.is_main and (step + 1) % settings.checkpoint_every == 0 and step + 1 < settings.steps:
            with atomic_path(partial) as tmp:
                torch.save(
                    {
                        "settings": asdict(settings),
                        "previous": str(previous_checkpoint),
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": _rng_state(),
                        "step": step + 1,
                        "history": history,
                    },
                    tmp,
                )

    summary = {
        "phase": settings.index,
        "mode": settings.mode,
        "steps": settings.steps,
        "resumed_from_step": start,
        "seconds": time.perf_counter() - tic,
        "final_loss_total": history[-1]["loss_total"],
        **_mean_last(history, 10),
    }
    if not dist.is_main:
        return summary
    summary.update(_grounding(model, records, bank, tokenizer, settings))
    checkpoint.update(
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        rng=_rng_state(),
        step=settings.steps,
        history=checkpoint.get("history", []) + [{"phase": settings.index, "mode": settings.mode, "summary": summary}],
    )
    with atomic_path(out_checkpoint) as tmp:
        torch.save(checkpoint, tmp)
    write_json(metrics_path, {"summary": summary, "history": history}, indent=None)
    partial.unlink(missing_ok=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    """Per-process entry point under torchrun: `python -m semvlp.pretrain ARGS.json`."""
    args = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    args["settings"] = PhaseSettings(**args["settings"])
    run_phase(**args)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
