"""Pre-training: the initial checkpoint of a variant, and one phase (single, two or mixed mode).

A phase job starts from the previous phase's checkpoint and trains the shared stack in its mode with the
four objectives. Batches are a pure function of (seed, phase index, step), built ahead in DataLoader
worker processes (`LoaderSettings`; any number of workers gives the same batches): a phase killed
mid-way resumes from its last periodic checkpoint (`<output>.partial`) and ends exactly where an
uninterrupted run would (same seed, CPU). Each phase has its own optimiser and linear warm-up/decay
schedule (semvlp.engine); the weights carry over from phase to phase. A phase's checkpoint is one
safetensors file (`SemVLPForPreTraining.save_checkpoint`): the weights, with the model config, the
answer table and the phases so far in its header; no optimiser state, which the next phase would not use.

Distributed: under `torchrun` (WORLD_SIZE > 1) each process builds and reads only its rows
(every world_size-th) of the same global batch and DistributedDataParallel averages the gradients
(gloo on CPU, NCCL on GPUs); rank 0 alone writes checkpoints and metrics. On a GPU the forward pass
runs under bf16 autocast. `python -m semvlp.pretrain ARGS.json` is the per-process entry point
torchrun starts.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from semvlp.batching import RegionBank, TokenizedText, encoder_inputs
from semvlp.data.answers import AnswerTable
from semvlp.data.corpus import CORPUS_SOURCES, Corpus, read_corpus
from semvlp.diagnostics import grounding_report
from semvlp.engine import Distributed, OptimizerSettings, Trainer, file_stamp, split_rows
from semvlp.errors import InputError
from semvlp.io import write_json
from semvlp.loader import LoaderSettings, StepLoader, numpy_dtype
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
        dropout=model_settings["dropout"],
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
            type_vocab_size=model_settings["type_vocab_size"],
            init_scheme=model_settings["init_scheme"],
            **sizes,
        )
        model = SemVLPForPreTraining(config)
        report = {"init": "scratch"}
    else:
        config = SemVLPConfig.from_bert(init, **sizes)
        model = SemVLPForPreTraining(config)
        loaded = load_bert_checkpoint(model, init)
        report = {"init": str(init), "bert_loaded": len(loaded.loaded), "bert_fresh": len(loaded.fresh)}
    model.save_checkpoint(out_path, answers=list(answers.answers), init=report["init"], history=[])
    return {"parameters": sum(p.numel() for p in model.parameters()), **report}


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
    accumulation_steps: int  # micro-batches per optimiser step (the batch is dealt over them)
    # corpus sources whose sentences get an image-text matching label; a question does not describe
    # its image, so a mismatched image often fits it as well and its label would be noise
    itm_sources: tuple[str, ...]
    loss_weights: dict[str, float] = field(default_factory=dict)  # LossWeights' (all 1) where not given

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown phase mode {self.mode!r}; expected one of {MODES}")
        self.itm_sources = tuple(self.itm_sources)  # from YAML/JSON lists; compared on resume
        unknown = [source for source in self.itm_sources if source not in CORPUS_SOURCES]
        if unknown:
            raise ValueError(f"unknown ITM source {unknown[0]!r}; expected some of {CORPUS_SOURCES}")


class PretrainBatches:
    """Builds the batch of a given step, deterministically from (seed, phase index, step)."""

    def __init__(self, records: Corpus, answers: AnswerTable, bank: RegionBank, tokenizer, settings: PhaseSettings):
        self.records = records
        self.bank = bank
        self.tokenizer = tokenizer
        self.settings = settings
        # what a batch needs of the corpus, as arrays: a batch is then gathers, not a loop over records
        self.text = TokenizedText(tokenizer, records.sentences(), settings.max_text_length)
        used = records.image_indices()
        self.mismatch_images = np.array(sorted(used.tolist(), key=records.image_keys.__getitem__), np.int64)  # by key
        self.itm_sources = np.array([CORPUS_SOURCES.index(source) for source in settings.itm_sources])
        self.qa_target = np.array([answers.index.get(answer, -1) for answer in records.answers] + [-1], np.int64)

    def generator(self, step: int) -> torch.Generator:
        s = self.settings
        return torch.Generator().manual_seed(((s.seed * 1000 + s.index) * 1_000_003 + step) % (2**63))

    def mode(self, step: int) -> str:
        if self.settings.mode != "mixed":
            return self.settings.mode
        draw = torch.rand((), generator=self.generator(step)).item()
        return "single" if draw < self.settings.mixed_single_ratio else "two"

    def __call__(self, step: int, rows: slice = slice(None), features_out: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """The `rows` of the step's global batch (under torchrun a rank's rows, `rank::world_size`).

        Every draw is made for the whole global batch, so a rank's rows are exactly those rows of the
        batch one process would build; only the rows' region features are read. Features come
        unmasked (into `features_out` when given): `step_inputs` zeroes the masked regions on the
        training device.
        """
        s, g, corpus = self.settings, self.generator(step), self.records
        picks = torch.randint(len(corpus), (s.batch_size,), generator=g).numpy()
        # image-text matching: replace the image of some pairs (of the ITM sources) by another image
        draws = (torch.rand(s.batch_size, generator=g) < s.itm_mismatch_ratio).numpy()
        matched_kind = np.isin(corpus.source[picks], self.itm_sources)
        mismatch = draws & matched_kind
        images = corpus.image[picks].astype(np.int64)
        for row in np.flatnonzero(mismatch).tolist():  # in row order: each draw comes from the generator
            own = images[row]
            while images[row] == own:
                images[row] = self.mismatch_images[torch.randint(len(self.mismatch_images), (1,), generator=g).item()]
        keys = [corpus.image_keys[i] for i in images.tolist()]
        # the text is the whole batch's: masks are drawn over its [B, T], T its longest sentence
        text = self.text.batch(picks)
        input_ids, mlm_labels = mask_tokens(
            text["input_ids"],
            text["special_tokens_mask"] | ~text["text_mask"],
            mask_token_id=self.tokenizer.mask_token_id,
            vocab_size=len(self.tokenizer),
            prob=s.text_mask_prob,
            generator=g,
        )
        masked_regions = mask_regions(self.bank.region_mask(keys), prob=s.region_mask_prob, generator=g)
        itm = torch.from_numpy(np.where(matched_kind, np.where(mismatch, 0, 1), -1))
        # corpus answer -1 (none) reads the table's trailing -1; a mismatched pair's answer is not its image's
        qa = torch.from_numpy(np.where(mismatch, -1, self.qa_target[corpus.answer[picks]]))
        batch = self.bank.batch(keys[rows], features_out)
        batch.update(
            input_ids=input_ids[rows],  # [B, T]
            text_mask=text["text_mask"][rows],  # [B, T]
            mlm_labels=mlm_labels[rows],  # [B, T], -100 where not masked
            masked_regions=masked_regions[rows],  # [B, K]
            itm_labels=itm[rows],  # [B], -1 for sentences of sources without ITM
            qa_labels=qa[rows],  # [B], -1 where no QA target
        )
        return batch


def batch_loader(batches: PretrainBatches, steps: range, rows: slice, settings: LoaderSettings, device: torch.device) -> StepLoader:
    """This process's rows of the batches of `steps`, in step order (semvlp.loader)."""
    shape = (len(range(batches.settings.batch_size)[rows]), batches.bank.max_boxes, batches.bank.feature_dim)
    return StepLoader(batches, steps, rows, shape, numpy_dtype(batches.bank.feature_dtype), settings, device)


def step_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on the training device, where the masked regions' features are zeroed; the unmasked
    features are the regression targets (so only one copy of them travels)."""
    batch = {name: value.to(device, non_blocking=True) for name, value in batch.items()}
    batch["target_feats"] = batch["region_feats"]  # [B, K, D]
    batch["region_feats"] = batch["region_feats"].masked_fill(batch["masked_regions"].unsqueeze(-1), 0.0)
    return batch


def _grounding(model, records, bank, tokenizer, settings: PhaseSettings) -> dict[str, float]:
    """grounding_{mode}_* of the phase's final model on a fixed sample of its ITM-source sentences
    (semvlp.diagnostics), in both modes: the weights are shared, so a phase of one mode can help or
    hurt the other, and alternating schedules are judged by that."""
    described = records.of_sources(settings.itm_sources)
    if len(described.images()) < 2:
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


def target_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[len(LOSS_NAMES)] float64: how many targets each loss term averages over in this batch (masked
    tokens, masked regions three times, ITM pairs, answered questions with their own image)."""
    masked = (batch["masked_regions"] & batch["region_mask"]).sum()
    return torch.stack(
        [
            (batch["mlm_labels"] >= 0).sum(),
            masked,
            masked,
            masked,
            (batch["itm_labels"] >= 0).sum(),
            ((batch["qa_labels"] >= 0) & (batch["itm_labels"] != 0)).sum(),
        ]
    ).double()


def share_of_batch(losses: dict[str, torch.Tensor], share: torch.Tensor, weights: LossWeights) -> dict[str, torch.Tensor]:
    """Rescale a micro-batch's per-term means by its share of the global batch's targets (its count
    x world size / the global count): summed over micro-batches and averaged over ranks by DDP, the
    gradient is that of the whole batch's means, although counts differ between micro-batches."""
    scaled = {name: losses[name] * factor for name, factor in zip(LOSS_NAMES, share.tolist())}
    scaled["total"] = sum(getattr(weights, name) * scaled[name] for name in LOSS_NAMES)
    return scaled


def check_batch_split(batch_size: int, world_size: int, accumulation_steps: int) -> None:
    """A global batch is dealt row by row over ranks, then over micro-batches: both must divide it."""
    if batch_size % (world_size * accumulation_steps):
        raise ValueError(
            f"batch size {batch_size} does not split over {world_size} processes x {accumulation_steps} accumulation steps"
        )


def _train_step(trainer: Trainer, batch: dict[str, torch.Tensor], mode: str, weights: LossWeights) -> dict[str, float]:
    """One optimiser step on this rank's rows of a step's batch; returns the whole batch's logged values."""
    parts, world = trainer.settings.accumulation_steps, trainer.dist.world_size
    rescale = parts > 1 or world > 1
    total = trainer.dist.sum(target_counts(batch)).clamp(min=1) if rescale else None

    def loss_of(micro):
        # the masked-LM and masked-object heads run only where the losses read them
        output = trainer.module(**encoder_inputs(micro), mode=mode, **head_positions(micro))
        losses = pretraining_losses(output, micro, weights)
        if rescale:
            losses = share_of_batch(losses, target_counts(micro) * world / total, weights)
        return losses["total"], ({k: v.item() for k, v in losses.items()}, _itm_counts(output, micro))

    results = trainer.step(split_rows(batch, parts), loss_of)
    summed = {f"loss_{k}": sum(losses[k] for losses, _ in results) for k in results[0][0]}
    summed["itm_right"] = sum(right for _, (right, _) in results)
    summed["itm_labelled"] = sum(labelled for _, (_, labelled) in results)
    values = trainer.dist.mean(summed)
    right, labelled = values.pop("itm_right"), values.pop("itm_labelled")
    if labelled:  # a ratio of rank means is the ratio of sums; 0.5 while nothing is grounded yet
        values["itm_accuracy"] = right / labelled
    return values


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
    loader: LoaderSettings | None = None,
    job=None,
) -> dict[str, Any]:
    """Train one phase; returns its summary metrics (also written to metrics_path)."""
    dist = Distributed.from_env()
    check_batch_split(settings.batch_size, dist.world_size, settings.accumulation_steps)
    model, previous = SemVLPForPreTraining.from_checkpoint(previous_checkpoint)
    tokenizer = load_tokenizer(tokenizer_dir)
    answers = AnswerTable.load(answers_path)
    records = read_corpus(corpus_path)
    if not records:
        raise InputError("the pre-training corpus is empty", corpus_path)
    bank = RegionBank(feature_paths, box_dim=model.config.box_dim)
    bank.check_ids(records.images(), corpus_path)
    batches = PretrainBatches(records, answers, bank, tokenizer, settings)
    weights = LossWeights(**settings.loss_weights)
    optimizer_settings = OptimizerSettings(
        steps=settings.steps, lr=settings.lr, weight_decay=settings.weight_decay, warmup_ratio=settings.warmup_ratio,
        accumulation_steps=settings.accumulation_steps,
    )
    # single-stream steps leave the cross-attention module unused
    trainer = Trainer(model, optimizer_settings, dist=dist, find_unused_parameters=True)
    partial = Path(f"{out_checkpoint}.partial")
    identity = {"settings": asdict(settings), "previous": file_stamp(previous_checkpoint)}
    start, history = trainer.resume(partial, identity) or (0, [])
    if start:
        print(f"resuming phase {settings.index} ({settings.mode}) at step {start} from {partial}")

    model.train()
    tic = time.perf_counter()
    steps = range(start, settings.steps)
    progress = tqdm(
        steps, initial=start, total=settings.steps, desc=f"phase {settings.index} ({settings.mode})",
        mininterval=5, disable=not dist.is_main,
    )
    step_tic = time.perf_counter()
    for step, batch in zip(progress, batch_loader(batches, steps, dist.rows, loader or LoaderSettings(), dist.device)):
        mode = batches.mode(step)
        # dropout draws from the global RNG: seed it per step so a resumed run repeats it exactly
        torch.manual_seed(batches.generator(step).initial_seed() + 1)
        values = _train_step(trainer, step_inputs(batch, dist.device), mode, weights)
        if not math.isfinite(values["loss_total"]):
            raise FloatingPointError(f"phase {settings.index}: loss is {values['loss_total']} at step {step}")
        values["lr"] = trainer.lr
        # from batch to batch: the wait for input counts, so a starved GPU shows here
        values["samples_per_s"] = settings.batch_size / (time.perf_counter() - step_tic)
        step_tic = time.perf_counter()
        history.append({"step": step, "mode": mode, **values})
        if job is not None:
            job.log_metrics(values, step=step)
        progress.set_postfix(loss=f"{values['loss_total']:.3f}", refresh=False)  # tqdm prints every mininterval
        if (step + 1) % settings.checkpoint_every == 0 and step + 1 < settings.steps:
            trainer.save_partial(partial, step=step + 1, identity=identity, history=history)

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
    # the weights and what they were trained on; the optimiser state is not kept: each phase starts its own
    model.save_checkpoint(
        out_checkpoint,
        answers=previous["answers"],
        init=previous["init"],
        history=previous["history"] + [{"phase": settings.index, "mode": settings.mode, "summary": summary}],
    )
    write_json(metrics_path, {"summary": summary, "history": history}, indent=None)
    partial.unlink(missing_ok=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    """Per-process entry point under torchrun: `python -m semvlp.pretrain ARGS.json`."""
    args = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    args["settings"] = PhaseSettings(**args["settings"])
    args["loader"] = LoaderSettings(**args.get("loader", {}))
    run_phase(**args)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
