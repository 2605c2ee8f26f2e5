"""Fine-tuning on the tiny run's real checkpoint, features and data files."""

from __future__ import annotations

import torch

from semvlp.tasks import run_task
from semvlp.tasks.common import trained_mode


def test_finetuning_does_not_depend_on_the_global_random_state(tiny_run, tmp_path):
    """A job's process starts from an unseeded RNG; the task's new head must still be the same."""
    results = tiny_run.workdir / "results"
    nlvr2 = next((results / "data").rglob("nlvr2"))
    task_config = dict(train_split="train", eval_splits=["dev"], mode="single", epochs=1, batch_size=16, lr=1e-3, weight_decay=0.01, warmup_ratio=0.1)
    outcomes = []
    for disturbance in (1, 2):
        torch.manual_seed(disturbance)
        torch.rand(disturbance)
        summary, _ = run_task(
            "nlvr2",
            checkpoint=results / "pretrain" / "semvlp" / "phase2.pt",
            files={"train_data": nlvr2 / "train.json", "dev_data": nlvr2 / "dev.json"},
            features_path=results / "features" / "nlvr2.h5",
            tokenizer_dir=results / "tokenizer",
            task_config=task_config,
            seed=0,
            max_text_length=24,
            out_dir=tmp_path / str(disturbance),
        )
        predictions = (tmp_path / str(disturbance) / "predictions_dev.csv").read_text()
        outcomes.append((summary["train_loss_last"], predictions))
    assert outcomes[0] == outcomes[1]


def test_auto_mode_is_the_mode_of_the_last_phase(tiny_run, tmp_path):
    """`auto` fine-tunes in the mode the checkpoint last trained, exactly as if that mode were named."""
    results = tiny_run.workdir / "results"
    pretrain = results / "pretrain"
    assert trained_mode(pretrain / "none" / "phase0.pt") == "single"  # the initialisation
    assert trained_mode(pretrain / "semvlp" / "phase1.pt") == "single"
    assert trained_mode(pretrain / "semvlp" / "phase2.pt") == "two"
    nlvr2 = next((results / "data").rglob("nlvr2"))
    outcomes = {}
    for mode in ("auto", "two", "single"):
        summary, _ = run_task(
            "nlvr2",
            checkpoint=pretrain / "semvlp" / "phase2.pt",
            files={"train_data": nlvr2 / "train.json", "dev_data": nlvr2 / "dev.json"},
            features_path=results / "features" / "nlvr2.h5",
            tokenizer_dir=results / "tokenizer",
            task_config=dict(train_split="train", eval_splits=["dev"], mode=mode, epochs=1, batch_size=16, lr=1e-3, weight_decay=0.01, warmup_ratio=0.1),
            seed=0,
            max_text_length=24,
            out_dir=tmp_path / mode,
        )
        outcomes[mode] = summary
    assert outcomes["auto"]["mode"] == "two"
    assert outcomes["auto"]["train_loss_last"] == outcomes["two"]["train_loss_last"]
    assert outcomes["two"]["train_loss_last"] != outcomes["single"]["train_loss_last"]
