"""What every fine-tuning task shares: the `Task` interface, the encoder from a pre-training
checkpoint, the training loop, saving a fine-tuned task model.

A fine-tuning job runs on the GPU when it has one (the rule's `gpu` resource), with bf16 autocast over
forward passes and losses as pre-training uses there; batches are built on the CPU and moved by the
encoder. On the CPU everything stays float32.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn
from tqdm import tqdm

from semvlp.batching import RegionBank, encode_text, encoder_inputs
from semvlp.engine import OptimizerSettings, Trainer, autocast
from semvlp.io import atomic_directory, write_json
from semvlp.model import CONFIG_NAME, WEIGHTS_NAME, SemVLPForPreTraining, read_weights_metadata, save_weights
from semvlp.tasks import TaskSettings, TaskSpec, task_spec
from semvlp.tokenization import save_tokenizer

# What a saved task model needs besides its weights: the task, the encoder mode, the answer table...
TASK_FILE = "task.json"


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


class Task:
    """A fine-tuning task. A subclass names its `TASKS` entry (`name`) and says how to build its
    training examples, its model, the loss of a batch, the predictions of a split and their scores;
    `semvlp.tasks.runner` does the rest (the same training loop, saving, loading) for every task.

    `files` are the task's files by name (`TaskSpec.files`), `bank` the feature stores of its image sets.
    """

    name: ClassVar[str]

    def __init__(self, settings: TaskSettings, files: dict[str, Path], bank: RegionBank, tokenizer):
        self.settings, self.files, self.bank, self.tokenizer = settings, {k: Path(v) for k, v in files.items()}, bank, tokenizer
        # random generators the loss draws from, saved with a partial checkpoint so a resumed run replays them
        self.generators: dict[str, torch.Generator] = {}

    @property
    def spec(self) -> TaskSpec:
        return task_spec(self.name)

    def training_examples(self) -> tuple[list, dict[str, Any]]:
        """The training examples of all training splits, and what the saved model must record besides
        the common keys (e.g. the answer table) as a dict for task.json."""
        raise NotImplementedError

    def build_model(self, encoder: Encoder, info: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, examples: Sequence, step: int) -> torch.Tensor:
        """The mean loss of `examples` at optimiser step `step`."""
        raise NotImplementedError

    def predict(self, model: nn.Module, info: dict[str, Any], split: str, out_dir: str | Path) -> Path:
        """Predict `split` into the file its benchmark takes (needs no labels); returns its path."""
        raise NotImplementedError

    def evaluate(self, split: str, predictions_path: Path, info: dict[str, Any]) -> dict[str, Any]:
        """The split's metrics; for a split without labels, the local check of the server file."""
        raise NotImplementedError


class QuestionAnsweringTask(Task):
    """Classification over an answer table from the pooled output (VQA, GQA)."""

    def build_model(self, encoder: Encoder, info: dict[str, Any]) -> AnswerClassifier:
        return AnswerClassifier(encoder, len(info["answers"]))

    def question_batch(self, items: Sequence[tuple[str, str, str]]) -> dict[str, torch.Tensor]:
        """The model inputs of (image set, image id, question) items."""
        batch = self.bank.batch([(image_set, img_id) for image_set, img_id, _ in items])
        batch.update(encode_text(self.tokenizer, [text for _, _, text in items], self.settings.max_text_length))
        return batch

    def predict_answers(self, model: AnswerClassifier, items: Sequence[tuple[str, str, str]], answers: Sequence[str]) -> list[str]:
        """The highest-scoring answer of the table for each (image set, image id, question)."""
        predicted: list[str] = []
        with torch.no_grad(), autocast(device_of(model)):
            for chunk in batches_of(items, 256):
                predicted += [answers[i] for i in model(self.question_batch(chunk)).argmax(-1).tolist()]
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


def save_task_model(model: nn.Module, out_dir: str | Path, info: dict[str, Any], tokenizer) -> None:
    """A fine-tuned model as a directory that loads without the workflow (semvlp.tasks.runner.load_task_model):
    the encoder's config.json, the whole model's model.safetensors, task.json and the tokenizer files.
    Written whole or not at all."""
    config = model.encoder.config
    with atomic_directory(out_dir) as tmp:
        write_json(tmp / CONFIG_NAME, config.to_dict(), indent=2)
        save_weights(model, tmp / WEIGHTS_NAME, config, task=info["task"])
        write_json(tmp / TASK_FILE, info, indent=2)
        save_tokenizer(tokenizer, tmp)
