"""Config validation: schema errors name the key; Snakemake stops before any job."""

from __future__ import annotations

import copy

import pytest
import yaml

from conftest import REPO, run_snakemake
from semvlp.config import ConfigError, validate_config


@pytest.fixture
def default_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_default_and_tiny_configs_are_valid(default_config):
    validate_config(copy.deepcopy(default_config))
    tiny = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    merged = copy.deepcopy(default_config)
    for key, value in tiny.items():
        if isinstance(value, dict):
            merged[key].update(value)
        else:
            merged[key] = value
    validate_config(merged)


def test_defaults_are_filled_in(default_config):
    del default_config["regions"]["skip_bad_images"]
    validate_config(default_config)
    assert default_config["regions"]["skip_bad_images"] is False
    assert default_config["finetune"]["tasks"]["gqa"]["weight_decay"] == 0.01


@pytest.mark.parametrize(
    "mutate, key, words",
    [
        (lambda c: c["pretrain"]["phase"].update(steps="many"), "pretrain.phase.steps", "not of type 'integer'"),
        (lambda c: c["model"].update(hidden_sise=64), "model.hidden_sise", "unknown key"),
        (lambda c: c.update(colour="red"), "colour", "unknown key"),
        (lambda c: c["finetune"]["tasks"]["vqa"].update(lr_typo=1.0), "finetune.tasks.vqa.lr_typo", "unknown key"),
        (lambda c: c["finetune"]["tasks"]["vqa"].update(mode="triple"), "finetune.tasks.vqa.mode", "triple"),
        (lambda c: c["pretrain"]["variants"]["semvlp"].update(phases=["single", "three"]), "pretrain.variants.semvlp.phases.1", "three"),
        (lambda c: c["regions"]["selection"].update(min_boxes=50), "regions.selection.min_boxes", "larger than max_boxes"),
        (lambda c: c["model"].update(num_heads=3), "model.num_heads", "does not divide"),
        (lambda c: c["report"].update(variants=["semvlp", "nope"]), "report.variants.1", "not a variant"),
        (lambda c: c["data"].pop("root"), "data", "'root' is a required property"),
        (lambda c: c.update(resources={"pretrain_phase": {"loader_workers": -1}}), "resources.pretrain_phase.loader_workers", "minimum"),
        (lambda c: c["pretrain"]["phase"].update(accumulation_steps=3), "pretrain.phase.batch_size", "does not split over 1 GPU processes"),
        (lambda c: c.update(resources={"pretrain_phase": {"gpu": 8}}) or c["pretrain"]["phase"].update(batch_size=12),
         "pretrain.phase.batch_size", "does not split over 8 GPU processes"),
        (lambda c: c["finetune"]["tasks"]["nlvr2"].update(checkpoint_every=0), "finetune.tasks.nlvr2.checkpoint_every", "minimum"),
    ],
)
def test_bad_values_name_the_key(default_config, mutate, key, words):
    mutate(default_config)
    with pytest.raises(ConfigError) as err:
        validate_config(default_config)
    message = str(err.value)
    assert f"'{key}'" in message and words in message
    assert "\n" not in message


def test_snakemake_stops_before_any_job_naming_the_key(tmp_path):
    (tmp_path / "bad.yaml").write_text("pretrain:\n  phase:\n    steps: many\n")
    result = run_snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "bad.yaml"), timeout=120)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "config key 'pretrain.phase.steps': 'many' is not of type 'integer'" in output
    assert "Job stats" not in output and not (tmp_path / "results").exists()

    (tmp_path / "unknown.yaml").write_text("finetune:\n  seedz: [1]\n")
    result = run_snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "unknown.yaml"), timeout=120)
    assert result.returncode != 0
    assert "config key 'finetune.seedz': unknown key" in result.stdout + result.stderr
