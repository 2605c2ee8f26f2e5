"""A variant's pre-trained model as a shareable directory: `save_pretrained` files, the tokenizer and
a model card (README.md) that says what the model was trained on and how it fine-tunes.

    results/models/{variant}/  config.json  model.safetensors  vocab.txt tokenizer*.json  README.md

It loads without the workflow: `SemVLPForPreTraining.from_pretrained(dir)` and `load_tokenizer(dir)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from semvlp.io import atomic_directory, config_digest, write_text
from semvlp.model import SemVLPForPreTraining
from semvlp.report import paper_table, tidy_rows
from semvlp.tokenization import load_tokenizer, save_tokenizer

CARD_NAME = "README.md"


def export_model(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    variant: str,
    tokenizer_dir: str | Path,
    finetune_metrics: list[str | Path],
    recipe: dict[str, Any],
    provenance: dict[str, str],
) -> dict[str, Any]:
    """Write the export of `checkpoint` (the variant's last phase) into `out_dir`, whole or not at all.

    `recipe` is the config that made the model (data, regions, model, pre-training), `provenance` the
    code commit and the MLflow run of the checkpoint, `finetune_metrics` the variant's fine-tuning jobs'
    metrics.json files (their results go into the card)."""
    model, metadata = SemVLPForPreTraining.from_checkpoint(checkpoint)
    carried = {key: value for key, value in metadata.items() if key not in ("format", "config")}
    table = tidy_rows(finetune_metrics)
    parameters = sum(p.numel() for p in model.parameters())
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, **carried)
        save_tokenizer(load_tokenizer(tokenizer_dir), tmp)
        results = paper_table(table, [variant]) if len(table) else None
        write_text(tmp / CARD_NAME, model_card(variant, model, parameters, metadata, results, recipe, provenance))
    return {"parameters": parameters, "phases": len(metadata["history"]), "finetune_rows": len(table)}


def model_card(
    variant: str,
    model: SemVLPForPreTraining,
    parameters: int,
    metadata: dict[str, Any],
    results: str | None,
    recipe: dict[str, Any],
    provenance: dict[str, str],
) -> str:
    config = model.config
    loss_names = _loss_names(metadata) if metadata["history"] else []
    lines = [
        f"# SemVLP `{variant}`",
        "",
        f"A SemVLP model pre-trained by the SemVLP workflow: {config.num_layers} layers, hidden size "
        f"{config.hidden_size}, {config.cross_layers} cross-attention layers, "
        f"{parameters:,} parameters, initialised from `{metadata['init']}`.",
        "",
        "```python",
        "from semvlp.model import SemVLPForPreTraining",
        "from semvlp.tokenization import load_tokenizer",
        "model = SemVLPForPreTraining.from_pretrained(DIR)  # safetensors: loading runs no code",
        "tokenizer = load_tokenizer(DIR)",
        "```",
        "",
        "## Provenance",
        "",
        f"* Recipe digest: `{config_digest(recipe)}` (the recipe is below)",
        f"* Code commit: `{provenance['commit']}`" + (" (with uncommitted changes)" if provenance.get("dirty") == "true" else ""),
        f"* MLflow run of the last phase: `{provenance['run_id']}`",
        f"* Data: `{recipe['data']['root']}`, corpus sources {', '.join(recipe['data']['corpus']['sources'])}",
        f"* Answer table: {len(metadata['answers'])} answers (the image-QA head)",
        "",
        "## Pre-training phases",
        "",
    ]
    if metadata["history"]:
        lines += ["| phase | mode | steps | final total loss | " + " | ".join(loss_names) + " |"]
        lines += ["|" + "---|" * (4 + len(loss_names))]
        for entry in metadata["history"]:
            summary = entry["summary"]
            losses = [f"{summary.get(f'mean_last10_loss_{name}', float('nan')):.3f}" for name in loss_names]
            lines.append(f"| {entry['phase']} | {entry['mode']} | {summary['steps']} | {summary['final_loss_total']:.3f} | " + " | ".join(losses) + " |")
        lines += ["", "Loss terms: mean over the phase's last 10 steps."]
    else:
        lines.append("None: this is the initialisation (the ablation's `none`).")
    lines += ["", "## Fine-tuning results", ""]
    lines.append(results if results else "No fine-tuning results were given.")
    lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=True).rstrip(), "```", ""]
    return "\n".join(lines)


def _loss_names(metadata: dict[str, Any]) -> list[str]:
    summary = metadata["history"][-1]["summary"]
    return sorted(key.removeprefix("mean_last10_loss_") for key in summary if key.startswith("mean_last10_loss_") and not key.endswith("total"))
