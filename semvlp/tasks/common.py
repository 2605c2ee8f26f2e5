"""What every fine-tuning task shares: the encoder from a pre-training checkpoint, the training loop,
saving and loading a fine-tuned task model.

A fine-tuning job runs on the GPU when it has one (the rule's `gpu` resource), with bf16 autocast over
forward passes and losses as pre-training uses there; batches are built on the CPU and moved by the
encoder. On the CPU everything stays float32.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from semvlp.batching import RegionBank, encode_text, encoder_inputs
from semvlp.engine import OptimizerSettings, Trainer, autocast, file_stamp
from semvlp.io import atomic_directory, write_json
from semvlp.model import CONFIG_NAME, WEIGHTS_NAME, SemVLPForPreTraining, read_weights_metadata, save_weights
from semvlp.tokenization import save_tokenizer

# What a saved task model needs besides its weights: the task, the encoder mode, the answer table...
TASK_FILE = "task.json"


@dataclass
class TaskSettings:
    """A task's settings: every value comes from the validated config (the schema holds the defaults)."""

    train_split: str
    eval_splits: list[str]
    mode: str  # single | two | both (outputs of the two modes averaged) | auto (see trained_mode)
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_ratio: float
    seed: int
    max_text_length: int
    checkpoint_every: int  # steps between partial checkpoints (a rerun resumes from the last)
    accumulation_steps: int  # micro-batches per optimiser step
    max_train_examples: int | None

    @classmethod
    def from_config(cls, task_config: dict[str, Any], *, seed: int, max_text_length: int) -> "TaskSettings":
        """From a task's section of the validated config (task-specific keys are left to the task)."""
        keys = [name for name in cls.__dataclass_fields__ if name not in ("seed", "max_text_length")]
        return cls(seed=seed, max_text_length=max_text_length, **{key: task_config[key] for key in keys})


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def trained_mode(checkpoint_path) -> str:
    """The encoder mode the checkpoint's last pre-training phase trained: `two` after a two-stream phase,
    otherwise `single` (the initialisation, a single-stream or a mixed phase).

    Why it matters: the stack's weights are shared, but a two-stream phase erases what single-stream
    phases taught the single-stream mode: after `[single, two, single, two]` that mode answers
    existence questions at chance while the two-stream mode gets 77% (README, "Which mode to fine-tune in").
    """
    history = read_weights_metadata(checkpoint_path)["history"]  # the header only, not the weights
    return "two" if history and history[-1]["mode"] == "two" else "single"


class Encoder(nn.Module):
    """The pre-trained shared stack run in the task's mode; `both` averages the two modes' outputs."""

    def __init__(self, pretrained: SemVLPForPreTraining, mode: str):
        super().__init__()
        self.model = pretrained
        self.config = pretrained.config
        self.mode = mode

    @classmethod
    def from_checkpoint(cls, checkpoint_path, mode: str) -> "Encoder":
        pretrained, _ = SemVLPForPreTraining.from_checkpoint(checkpoint_path)
        return cls(pretrained, mode)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def forward(self, batch: dict[str, torch.Tensor]):
        device = device_of(self.model)
        inputs = {key: value.to(device) for key, value in encoder_inputs(batch).items()}
        modes = ("single", "two") if self.mode == "both" else (self.mode,)
        outputs = [self.model.encoder(**inputs, mode=mode) for mode in modes]
        if len(outputs) == 1:
            return outputs[0]
        first, second = outputs
        return type(first)(
            text_hidden=(first.text_hidden + second.text_hidden) / 2,
            region_hidden=(first.region_hidden + second.region_hidden) / 2,
            pooled=(first.pooled + second.pooled) / 2,
        )


def classifier_head(in_dim: int, hidden: int, out_dim: int) -> nn.Module:
    """LXMERT's answer head: Linear, GELU, LayerNorm, Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=1e-12), nn.Linear(hidden, out_dim))


class AnswerClassifier(nn.Module):
    """Question answering as classification over an answer table, from the pooled output (VQA, GQA)."""

    def __init__(self, encoder: Encoder, num_answers: int):
        super().__init__()
        self.encoder = encoder
        self.head = classifier_head(encoder.hidden_size, 2 * encoder.hidden_size, num_answers)

    def forward(self, batch) -> torch.Tensor:
        return self.head(self.encoder(batch).pooled)  # [B, A]


def question_batcher(bank: RegionBank, image_set: str, tokenizer, max_length: int) -> Callable[[Sequence], dict]:
    """Batches of questions (records with `img_id` and `question`) over one image set."""

    def make_batch(questions: Sequence) -> dict[str, torch.Tensor]:
        batch = bank.batch([(image_set, q.img_id) for q in questions])
        batch.update(encode_text(tokenizer, [q.question for q in questions], max_length))
        return batch

    return make_batch


def predict_answers(model: AnswerClassifier, questions: Sequence, make_batch, answers: Sequence[str]) -> list[str]:
    """The highest-scoring answer of the table for each question."""
    predicted: list[str] = []
    with torch.no_grad(), autocast(device_of(model)):
        for chunk in batches_of(questions, 256):
            predicted += [answers[i] for i in model(make_batch(chunk)).argmax(-1).tolist()]
    return predicted


def batches_of(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def train(
    model: nn.Module,
    examples: Sequence,
    loss_of_batch: Callable[[Sequence, int], torch.Tensor],
    settings: TaskSettings,
    job=None,
    desc: str = "fine-tune",
    *,
    partial: str | Path,
    identity: dict[str, Any],
    generators: dict[str, torch.Generator] | None = None,
) -> list[float]:
    """AdamW with linear warm-up and decay over `epochs` passes of shuffled examples; returns the loss
    of every step. loss_of_batch(examples, step) is the mean loss of those examples.

    Every `settings.checkpoint_every` steps the training state goes to `partial`; a rerun with the same
    `identity` (with the settings added) resumes there and ends as an uninterrupted run would: the
    epoch orders are replayed from the seed, the RNG and the task's `generators` restored.
    Moves `model` to the fine-tuning device, where it stays for evaluation; `partial` is removed at the end.
    """
    steps_per_epoch = (len(examples) + settings.batch_size - 1) // settings.batch_size
    total = steps_per_epoch * settings.epochs
    optimizer_settings = OptimizerSettings(
        steps=total, lr=settings.lr, weight_decay=settings.weight_decay, warmup_ratio=settings.warmup_ratio,
        accumulation_steps=settings.accumulation_steps,
    )
    trainer = Trainer(model, optimizer_settings, generators=generators)
    order_generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    identity = {**identity, "settings": asdict(settings), "examples": len(examples)}
    start, losses = trainer.resume(partial, identity) or (0, [])
    if start:
        print(f"resuming {desc} at step {start} of {total} from {partial}")
    model.train()
    progress = tqdm(total=total, initial=start, desc=desc, mininterval=5)
    for epoch in range(settings.epochs):
        # drawn for every epoch, also those a resume skips, so the orders replay from the seed
        order = torch.randperm(len(examples), generator=order_generator).tolist()
        for index, chunk in enumerate(batches_of(order, settings.batch_size)):
            step = epoch * steps_per_epoch + index
            if step < start:
                continue
            tic = time.perf_counter()
            # dealt as pre-training deals its rows (engine.split_rows); fewer examples than parts leave some empty
            parts = settings.accumulation_steps
            micro_chunks = [chunk[part::parts] for part in range(parts) if chunk[part::parts]]

            def loss_of(micro):
                loss = loss_of_batch([examples[i] for i in micro], step)
                if len(micro_chunks) > 1:  # each micro-batch's mean weighs by its share of the batch
                    loss = loss * (len(micro) / len(chunk))
                return loss, loss.item()

            losses.append(sum(trainer.step(micro_chunks, loss_of)))
            if job is not None:
                job.log_metrics(
                    {"train_loss": losses[-1], "lr": trainer.lr, "samples_per_s": len(chunk) / (time.perf_counter() - tic)},
                    step=step,
                )
            progress.update(1)
            progress.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}", refresh=False)  # printed every mininterval
            if (step + 1) % settings.checkpoint_every == 0 and step + 1 < total:
                trainer.save_partial(partial, step=step + 1, identity=identity, history=losses)
    progress.close()
    model.eval()
    Path(partial).unlink(missing_ok=True)
    return losses


def resume_point(out_dir: str | Path, checkpoint: str | Path, **task_values) -> dict[str, Any]:
    """train()'s `partial` (in the job's output folder) and `identity` (the pre-trained checkpoint's
    version and the task's own settings) for a task."""
    return {"partial": Path(out_dir) / "train.partial", "identity": {"checkpoint": file_stamp(checkpoint), **task_values}}


def task_info(task: str, settings: TaskSettings, checkpoint, examples: int, **extra: Any) -> dict[str, Any]:
    """A task model's task.json: what predicting needs (task, mode, text length, `extra` such as the
    answer table) and what it was trained on."""
    return {
        "task": task,
        "mode": settings.mode,
        "max_text_length": settings.max_text_length,
        **extra,
        "trained_on": {"split": settings.train_split, "examples": examples, "pretrained": file_stamp(checkpoint)},
        "settings": asdict(settings),
    }


def save_task_model(model: nn.Module, out_dir: str | Path, info: dict[str, Any], tokenizer) -> None:
    """A fine-tuned model as a directory that loads without the workflow (semvlp.tasks.load_task_model):
    the encoder's config.json, the whole model's model.safetensors, task.json and the tokenizer files.
    Written whole or not at all."""
    config = model.encoder.config
    with atomic_directory(out_dir) as tmp:
        write_json(tmp / CONFIG_NAME, config.to_dict(), indent=2)
        save_weights(model, tmp / WEIGHTS_NAME, config, task=info["task"])
        write_json(tmp / TASK_FILE, info, indent=2)
        save_tokenizer(tokenizer, tmp)
