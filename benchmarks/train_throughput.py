"""Benchmark: pre-training step throughput of SemVLP against the transformers reference models, on CPU.

Pairs (each measured in this one run, on this machine):

* two-stream: our `SemVLPForPreTraining` in `mode="two"` against `transformers.LxmertForPreTraining`,
* single-stream: our model in `mode="single"` against `transformers.VisualBertForPreTraining`.

All models are built from their config classes with random weights (nothing is downloaded).

One training step is what `semvlp.pretrain.run_phase` does: zero the gradients, forward, losses,
backward, clip the gradient norm to 1, `torch.optim.AdamW` step. Reference models compute their losses
inside their own forward from the labels they are given; the step around it is the same. Every model
runs in training mode (dropout 0.1).

Sizes and why they are "matched". Compute is what a throughput comparison must hold equal, and in a
two-stream model it is set by how many layers each modality's tokens go through, not by how many
weights there are. LXMERT runs text through its l language layers and then x cross layers, and regions
through r object layers and then the same x cross layers; a cross layer holds a self-attention and a
feed-forward sub-layer per modality plus one cross-attention sub-layer per direction. Our shared stack
in two-stream mode runs each modality through all `num_layers` layers, and its top k layers hold the
same cross-attention sub-layer per direction. So the matched depth is num_layers = l + x for text and
r + x for regions, with k = x:

* tiny: hidden 256, 4 heads, FFN 1024. LXMERT 2/2/2 (text depth 4, region depth 4) against ours with
  4 layers, k = 2: the same number of layers, sub-layers and FLOPs per token in both modalities.
  VisualBERT gets 4 layers, like ours in single-stream mode.
* base: hidden 768, 12 heads, FFN 3072. LXMERT 9/5/5 (text depth 14, region depth 10) against ours with
  12 layers, k = 5 (BERT-base's depth, the one the paper's shared stack has): with T = 20 words and
  R = 36 regions that is 672 token-layers per example for ours against LXMERT's 640, so ours does about
  5% more encoder work. VisualBERT gets 12 layers (BERT-base).

Objectives. Ours and LXMERT train the same set: masked LM (15% of words), masked objects (15% of
regions: 2048-d feature regression, 1600 detector object labels and 400 attribute labels, weighted
by detector confidence), image-text matching (half the pairs mismatched) and image QA over 9500
answers (matched pairs only). VisualBERT's pre-training heads cover only masked LM and image-text
matching, so in the single-stream pair ours computes three more heads than the reference does: the
single-stream ratio is a conservative one. All models share BERT's vocabulary size (30522), the text
length, the number of regions (36, all real) and 2048-d region features with 4-d box geometry.

Our step passes `semvlp.objectives.head_positions(batch)` to the forward, so the masked-LM and
masked-object heads run only at the masked tokens and masked regions that the losses read (the losses
are the same as with heads everywhere); the reference models compute their heads at every position,
as their own pre-training code does.

Work done. Each model's arithmetic per training step (forward and backward, as counted by
`torch.utils.flop_counter.FlopCounterMode` on one untimed step: matrix products and attention, the
work that dominates a step) is printed beside its speed, with the achieved rate and the reference's /
ours FLOP ratio. Two implementations that run equally efficiently have a speed ratio equal to their
FLOP ratio; a speed ratio above the FLOP ratio means ours runs faster per FLOP. With `--peak-tflops`
(the chip's peak for the precision used) the table adds model FLOPs utilisation (MFU).

Timing: the steps of a pair are interleaved (ours, reference, ours, reference, ...), so a change in
the load of the machine hits both alike; the first `--warmup` steps of each are not timed; samples/s is
the batch size over the median wall-clock time of the `--steps` timed steps. The table also gives the
median CPU time of the process per step (all threads). With `--threads 1` that is a measure of the work
done which other jobs on a shared machine barely move; with 2 threads, OpenMP threads spinning while
they wait for a descheduled partner count too, so on a busy machine it is as noisy as wall-clock time
(the run prints the machine's load average to judge by).

    python benchmarks/train_throughput.py                  # both sizes, batch 32: ~7 min on an idle 2-core CPU
    python benchmarks/train_throughput.py --sizes tiny     # tiny only
    python benchmarks/train_throughput.py --threads 1      # the contention-robust CPU-time comparison
    python benchmarks/train_throughput.py --heads-everywhere   # ours without head_positions, for comparison
    python benchmarks/train_throughput.py --device cuda --bf16 --sizes base --batch-size 64 --peak-tflops 989
        # on a GPU: bf16 autocast as `semvlp.pretrain` uses there, MFU against the chip's dense bf16 peak
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from semvlp.model import SemVLPConfig, SemVLPForPreTraining, box_geometry  # noqa: E402
from semvlp.objectives import LossWeights, head_positions, mask_regions, mask_tokens, pretraining_losses  # noqa: E402

VOCAB_SIZE = 30522  # BERT's WordPiece vocabulary
FEATURE_DIM = 2048
BOX_DIM = 4
NUM_OBJECT_LABELS = 1600
NUM_ATTRIBUTE_LABELS = 400
NUM_ANSWERS = 9500
CLS_ID, SEP_ID, MASK_ID = 101, 102, 103  # BERT's special token ids
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-4, 0.01, 1.0


@dataclass(frozen=True)
class Size:
    """One matched size: the shared width and the depths of each model (see the module docstring)."""

    name: str
    hidden: int
    heads: int
    intermediate: int
    lxmert_layers: tuple[int, int, int]  # (l language, x cross, r object)
    ours_layers: int
    ours_cross_layers: int
    visualbert_layers: int


SIZES = {
    "tiny": Size("tiny", 256, 4, 1024, (2, 2, 2), ours_layers=4, ours_cross_layers=2, visualbert_layers=4),
    "base": Size("base", 768, 12, 3072, (9, 5, 5), ours_layers=12, ours_cross_layers=5, visualbert_layers=12),
}


# --------------------------------------------------------------------------------------- batch


def make_batch(
    batch_size: int, text_len: int, num_regions: int, seed: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """One pre-training batch in our format (see `semvlp.objectives.pretraining_losses`), on `device`."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, VOCAB_SIZE, (batch_size, text_len), generator=gen)  # [B, T]
    ids[:, 0], ids[:, -1] = CLS_ID, SEP_ID
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    input_ids, mlm_labels = mask_tokens(ids, special, mask_token_id=MASK_ID, vocab_size=VOCAB_SIZE, generator=gen)
    region_mask = torch.ones(batch_size, num_regions, dtype=torch.bool)  # [B, R]
    # ReLU-pooled detector features: non-negative, mostly small, a few large
    feats = torch.relu(torch.randn(batch_size, num_regions, FEATURE_DIM, generator=gen)) ** 2  # [B, R, D]
    corners = torch.rand(batch_size, num_regions, 2, 2, generator=gen) * torch.tensor([640.0, 480.0])
    boxes = torch.cat([corners.min(dim=2).values, corners.max(dim=2).values], dim=-1)  # [B, R, 4] xyxy pixels
    masked_regions = mask_regions(region_mask, generator=gen)
    matched = torch.rand(batch_size, generator=gen) < 0.5
    answers = torch.randint(NUM_ANSWERS, (batch_size,), generator=gen)
    batch = dict(
        input_ids=input_ids,
        text_mask=torch.ones_like(ids, dtype=torch.bool),
        region_feats=feats.masked_fill(masked_regions[..., None], 0.0),
        region_geom=box_geometry(boxes, 640, 480, dim=BOX_DIM),
        region_mask=region_mask,
        mlm_labels=mlm_labels,
        masked_regions=masked_regions,
        target_feats=feats,
        obj_labels=torch.randint(NUM_OBJECT_LABELS, (batch_size, num_regions), generator=gen),
        obj_confs=torch.rand(batch_size, num_regions, generator=gen),
        attr_labels=torch.randint(NUM_ATTRIBUTE_LABELS, (batch_size, num_regions), generator=gen),
        attr_confs=torch.rand(batch_size, num_regions, generator=gen),
        itm_labels=matched.long(),
        qa_labels=torch.where(matched, answers, torch.full_like(answers, -1)),
    )
    return {key: value.to(device) for key, value in batch.items()}


# --------------------------------------------------------------------------------------- models and their losses


def ours(size: Size) -> SemVLPForPreTraining:
    config = SemVLPConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=size.hidden,
        num_layers=size.ours_layers,
        num_heads=size.heads,
        intermediate_size=size.intermediate,
        max_position_embeddings=512,
        region_feature_dim=FEATURE_DIM,
        box_dim=BOX_DIM,
        cross_layers=size.ours_cross_layers,
        num_object_labels=NUM_OBJECT_LABELS,
        num_attribute_labels=NUM_ATTRIBUTE_LABELS,
        num_answers=NUM_ANSWERS,
    )
    return SemVLPForPreTraining(config)


def ours_loss(mode: str, heads_everywhere: bool = False) -> Callable[[nn.Module, dict], torch.Tensor]:
    weights = LossWeights()

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        inputs = {key: batch[key] for key in ("input_ids", "text_mask", "region_feats", "region_geom", "region_mask")}
        # the masked-LM and masked-object heads run only where the losses read them, unless told otherwise
        positions = {} if heads_everywhere else head_positions(batch)
        output = model(**inputs, mode=mode, **positions)
        return pretraining_losses(output, batch, weights)["total"]

    return loss


def lxmert(size: Size) -> nn.Module:
    from transformers import LxmertConfig, LxmertForPreTraining

    l_layers, x_layers, r_layers = size.lxmert_layers
    config = LxmertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=size.hidden,
        num_attention_heads=size.heads,
        intermediate_size=size.intermediate,
        l_layers=l_layers,
        x_layers=x_layers,
        r_layers=r_layers,
        visual_feat_dim=FEATURE_DIM,
        visual_pos_dim=BOX_DIM,
        num_object_labels=NUM_OBJECT_LABELS,
        num_attr_labels=NUM_ATTRIBUTE_LABELS,
        num_qa_labels=NUM_ANSWERS,
    )
    return LxmertForPreTraining(config)


def lxmert_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    masked = batch["masked_regions"].float()  # LXMERT weights each region's loss by mask * confidence
    no_answer = torch.full_like(batch["qa_labels"], -100)  # CrossEntropyLoss's ignore_index
    output = model(
        input_ids=batch["input_ids"],
        visual_feats=batch["region_feats"],
        visual_pos=batch["region_geom"],
        attention_mask=batch["text_mask"].long(),
        visual_attention_mask=batch["region_mask"].long(),
        labels=batch["mlm_labels"],
        obj_labels={
            "obj": (batch["obj_labels"], masked * batch["obj_confs"]),
            "attr": (batch["attr_labels"], masked * batch["attr_confs"]),
            "feat": (batch["target_feats"], masked),
        },
        matched_label=batch["itm_labels"],
        ans=torch.where(batch["qa_labels"] >= 0, batch["qa_labels"], no_answer),
    )
    return output.loss


def visualbert(size: Size) -> nn.Module:
    from transformers import VisualBertConfig, VisualBertForPreTraining

    config = VisualBertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=size.hidden,
        num_hidden_layers=size.visualbert_layers,
        num_attention_heads=size.heads,
        intermediate_size=size.intermediate,
        visual_embedding_dim=FEATURE_DIM,
    )
    return VisualBertForPreTraining(config)


def visualbert_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    # VisualBERT's masked-LM labels cover text and regions; regions carry no target.
    region_labels = torch.full_like(batch["region_mask"], -100, dtype=torch.long)
    output = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["text_mask"].long(),
        visual_embeds=batch["region_feats"],
        visual_attention_mask=batch["region_mask"].long(),
        visual_token_type_ids=torch.ones_like(region_labels),
        labels=torch.cat([batch["mlm_labels"], region_labels], dim=1),
        # VisualBERT's label 0 means "matched", the opposite of ours
        sentence_image_labels=1 - batch["itm_labels"],
    )
    return output.loss


# --------------------------------------------------------------------------------------- timing


class Trainer:
    """One model, its loss and its AdamW optimiser; `step` runs one training step and returns its seconds."""

    def __init__(
        self,
        label: str,
        model: nn.Module,
        loss: Callable[[nn.Module, dict], torch.Tensor],
        device: torch.device,
        bf16: bool,
    ):
        self.label = label
        self.model = model.to(device).train()
        self.loss = loss
        self.device = device
        self.bf16 = bf16
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        self.flops = 0  # forward + backward FLOPs of one step (count_flops)
        self.seconds: list[float] = []  # wall-clock seconds of the timed steps
        self.cpu_seconds: list[float] = []  # CPU seconds of the process (all threads) in the timed steps

    def _forward_backward(self, batch: dict) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        # as `semvlp.pretrain` does on a GPU: autocast covers the forward pass and the losses
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            total = self.loss(self.model, batch)
        total.backward()
        return total

    def count_flops(self, batch: dict) -> None:
        """Count one step's forward and backward FLOPs (an untimed step: counting slows it down)."""
        with FlopCounterMode(display=False) as counter:
            self._forward_backward(batch)
        self.flops = counter.get_total_flops()
        self.optimizer.zero_grad(set_to_none=True)  # the counted step updates nothing

    def step(self, batch: dict) -> tuple[float, float]:
        """One training step; returns its (wall-clock, process CPU) seconds."""
        self._synchronize()
        tic, cpu_tic = time.perf_counter(), time.process_time()
        total = self._forward_backward(batch)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_GRAD_NORM)
        self.optimizer.step()
        self._synchronize()
        seconds, cpu_seconds = time.perf_counter() - tic, time.process_time() - cpu_tic
        if not torch.isfinite(total):
            raise FloatingPointError(f"{self.label}: loss is {total.item()}")
        return seconds, cpu_seconds

    def _synchronize(self) -> None:
        if self.device.type == "cuda":  # GPU kernels run asynchronously: wait for them before reading the clock
            torch.cuda.synchronize(self.device)


@dataclass
class Row:
    model: str
    size: str
    mode: str
    batch: int
    samples_per_s: float  # batch / median wall-clock step seconds
    cpu_seconds: float  # median CPU seconds per step (all threads)
    gflops: float  # forward + backward GFLOPs per step
    ratio: float | None  # ours / reference samples/s; None on a reference row
    cpu_ratio: float | None  # reference / ours CPU seconds per step; None on a reference row
    flop_ratio: float | None  # reference / ours FLOPs per step; None on a reference row

    @property
    def tflops_per_s(self) -> float:
        """Achieved rate: FLOPs per step over the median step time."""
        return self.gflops / 1e3 * self.samples_per_s / self.batch


def measure_pair(ours_trainer: Trainer, reference: Trainer, batch: dict, warmup: int, steps: int) -> None:
    """Interleaved steps of both trainers, the timed ones recorded on the trainers."""
    for index in range(warmup + steps):
        for trainer in (ours_trainer, reference):
            seconds, cpu_seconds = trainer.step(batch)
            if index >= warmup:
                trainer.seconds.append(seconds)
                trainer.cpu_seconds.append(cpu_seconds)
            print(
                f"  {trainer.label:<12} step {index + 1}/{warmup + steps}: {seconds:.3f} s ({cpu_seconds:.3f} s CPU)",
                file=sys.stderr,
            )


def run_size(size: Size, args: argparse.Namespace) -> list[Row]:
    device = torch.device(args.device)
    batch = make_batch(args.batch_size, args.text_len, args.regions, args.seed, device)
    pairs = (
        ("two", "LXMERT", lxmert, lxmert_loss),
        ("single", "VisualBERT", visualbert, visualbert_loss),
    )
    rows = []
    for mode, reference_name, build_reference, reference_loss in pairs:
        print(f"{size.name} {mode}-stream: SemVLP vs {reference_name}", file=sys.stderr)
        torch.manual_seed(args.seed)
        ours_trainer = Trainer("SemVLP", ours(size), ours_loss(mode, args.heads_everywhere), device, args.bf16)
        reference = Trainer(reference_name, build_reference(size), reference_loss, device, args.bf16)
        for trainer in (ours_trainer, reference):
            trainer.count_flops(batch)
        measure_pair(ours_trainer, reference, batch, args.warmup, args.steps)
        ours_rate = args.batch_size / statistics.median(ours_trainer.seconds)
        reference_rate = args.batch_size / statistics.median(reference.seconds)
        ours_cpu, reference_cpu = statistics.median(ours_trainer.cpu_seconds), statistics.median(reference.cpu_seconds)
        rows.append(
            Row(
                reference_name, size.name, mode, args.batch_size, reference_rate, reference_cpu,
                gflops=reference.flops / 1e9, ratio=None, cpu_ratio=None, flop_ratio=None,
            )
        )
        rows.append(
            Row(
                "SemVLP", size.name, mode, args.batch_size, ours_rate, ours_cpu, gflops=ours_trainer.flops / 1e9,
                ratio=ours_rate / reference_rate, cpu_ratio=reference_cpu / ours_cpu,
                flop_ratio=reference.flops / ours_trainer.flops,
            )
        )
        del ours_trainer, reference  # free the pair's weights and optimiser states before the next
    return rows


def print_table(rows: list[Row], peak_tflops: float | None) -> None:
    header = [
        "model", "size", "mode", "batch", "samples/s (median)", "ours/ref", "CPU s/step (median)", "ref/ours CPU",
        "GFLOP/step", "ref/ours FLOP", "TFLOP/s",
    ]
    if peak_tflops:
        header.append("MFU")
    table = [header]
    for row in rows:
        line = [
            row.model, row.size, row.mode, str(row.batch), f"{row.samples_per_s:.2f}",
            "" if row.ratio is None else f"{row.ratio:.2f}x",
            f"{row.cpu_seconds:.2f}",
            "" if row.cpu_ratio is None else f"{row.cpu_ratio:.2f}x",
            f"{row.gflops:.1f}",
            "" if row.flop_ratio is None else f"{row.flop_ratio:.2f}x",
            f"{row.tflops_per_s:.3f}",
        ]
        if peak_tflops:
            line.append(f"{row.tflops_per_s / peak_tflops:.1%}")
        table.append(line)
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    for index, line in enumerate(table):
        print("| " + " | ".join(cell.ljust(width) if column < 3 else cell.rjust(width)
                                for column, (cell, width) in enumerate(zip(line, widths))) + " |")
        if index == 0:
            print("|" + "|".join("-" * (width + 2) for width in widths) + "|")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "base"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--text-len", type=int, default=20)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast over the forward pass and the losses")
    parser.add_argument(
        "--peak-tflops", type=float, help="the device's peak TFLOP/s at the precision used; adds an MFU column"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--heads-everywhere",
        action="store_true",
        help="run our masked-LM and masked-object heads at every position, as before head_positions existed",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
        on = torch.cuda.get_device_name(device)
    else:
        on = f"{torch.get_num_threads()} threads on {os.cpu_count()} CPUs"

    load_before = os.getloadavg()[0]
    rows = [row for name in args.sizes for row in run_size(SIZES[name], args)]
    print(
        f"torch {torch.__version__}, {on}{', bf16 autocast' if args.bf16 else ', float32'} "
        f"(1-min load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end), "
        f"text {args.text_len} tokens, {args.regions} regions x {FEATURE_DIM}-d, "
        f"{args.warmup} warm-up + {args.steps} timed steps per model"
        + (", our heads at every position" if args.heads_everywhere else "")
    )
    print_table(rows, args.peak_tflops)
    arguments = sys.argv[1:] if argv is None else argv
    print("command: PYTHONPATH=. " + shlex.join([sys.executable, "benchmarks/train_throughput.py", *arguments]))


if __name__ == "__main__":
    main()
