"""The one training engine of pre-training phases and fine-tuning tasks.

`Trainer` owns what every training job repeats: the device and bf16 autocast, AdamW with a linear
warm-up and decay, gradient clipping, gradient accumulation over micro-batches, DistributedDataParallel
under torchrun, and periodic partial checkpoints from which a killed job resumes exactly. The caller
owns its batches and its loss: a step is `trainer.step(micro_batches, loss_of)`.

Exact resume: a partial checkpoint holds the weights, the optimiser and schedule, the global RNG, the
caller's own generators and the caller's history, with an `identity` (settings, input stamps) that
must match for it to be used. Everything in it is tensors and plain containers, loaded with
`torch.load(weights_only=True)`: a partial file cannot run code.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from semvlp.io import atomic_path


def default_device() -> torch.device:
    """The GPU when the job has one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device):
    """bf16 autocast on a GPU; a no-op on the CPU, where training stays float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def file_stamp(path: str | Path) -> dict[str, Any]:
    """What identifies an input file's version for a resume: a rewritten input invalidates a partial."""
    stat = Path(path).stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


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

    @property
    def rows(self) -> slice:
        """This rank's rows of a global batch."""
        return slice(self.rank, None, self.world_size)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks (the tensor itself in one process)."""
        if self.world_size > 1:
            values = values.clone()
            torch.distributed.all_reduce(values)
        return values

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average logged values over the ranks (what one process on the whole batch would log)."""
        if self.world_size == 1:
            return values
        tensor = self.sum(torch.tensor(list(values.values()), dtype=torch.float64))
        return dict(zip(values, (tensor / self.world_size).tolist()))


def linear_warmup_decay(optimizer: torch.optim.Optimizer, steps: int, warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first warmup_ratio of `steps`, then linear decay to 0 (BERT's schedule)."""
    warmup = max(1, int(steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class OptimizerSettings:
    steps: int  # optimiser steps of the whole job
    lr: float
    weight_decay: float
    warmup_ratio: float
    accumulation_steps: int = 1  # micro-batches per optimiser step
    clip_norm: float = 1.0


class Trainer:
    """Optimiser, schedule, clipping, accumulation, DDP and partial checkpoints around one model.

    `model` is moved to `dist.device`. Call the model through `trainer.module` in the loss (under
    torchrun that is the DistributedDataParallel wrapper, which averages gradients over the ranks).
    """

    def __init__(
        self,
        model: nn.Module,
        settings: OptimizerSettings,
        *,
        dist: Distributed | None = None,
        find_unused_parameters: bool = False,
        generators: dict[str, torch.Generator] | None = None,
    ):
        self.dist = dist or Distributed()
        self.model = model.to(self.dist.device)
        self.settings = settings
        self.module = (
            model if self.dist.world_size == 1
            else nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)
        )
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        self.scheduler = linear_warmup_decay(self.optimizer, settings.steps, settings.warmup_ratio)
        self.generators = generators or {}

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def step(self, micro_batches: Sequence[Any], loss_of: Callable[[Any], tuple[torch.Tensor, Any]]) -> list[Any]:
        """One optimiser step over the micro-batches of a batch: loss_of(micro) -> (loss, anything),
        under autocast; gradients add up over the micro-batches (each loss must carry its share of the
        batch's) and, under torchrun, are averaged over the ranks once, at the last micro-batch."""
        self.optimizer.zero_grad(set_to_none=True)
        results = []
        for position, micro in enumerate(micro_batches):
            last = position == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or self.dist.world_size == 1 else self.module.no_sync()
            with sync:
                with autocast(self.device):
                    loss, result = loss_of(micro)
                loss.backward()
            results.append(result)
        nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        return results

    # -- partial checkpoints ----------------------------------------------------------------------

    def save_partial(self, path: str | Path, *, step: int, identity: dict[str, Any], history: list) -> None:
        """The state to resume from after `step` optimiser steps (rank 0 writes it)."""
        if not self.dist.is_main:
            return
        with atomic_path(path) as tmp:
            torch.save(
                {
                    "identity": identity,
                    "step": step,
                    "history": history,
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "rng": {"torch": torch.get_rng_state(), **{name: g.get_state() for name, g in self.generators.items()}},
                },
                tmp,
            )

    def resume(self, path: str | Path, identity: dict[str, Any]) -> tuple[int, list] | None:
        """Load the partial at `path` if it was written by a run of the same `identity`; returns
        (steps done, history) or None (no partial, or one of other settings or inputs)."""
        path = Path(path)
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a foreign or truncated file: train from the start, and say why
            print(f"ignoring {path}: not a partial checkpoint of this engine ({type(err).__name__}: {err})")
            return None
        if not isinstance(state, dict) or state.get("identity") != identity:
            return None
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        for name, generator in self.generators.items():
            generator.set_state(state["rng"][name])
        return state["step"], state["history"]


def split_rows(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """A batch's rows dealt into `parts` micro-batches (row i into micro-batch i % parts)."""
    if parts == 1:
        return [batch]
    return [{name: values[part::parts] for name, values in batch.items()} for part in range(parts)]
