"""Config validation: schema errors name the key; Snakemake stops before any job."""

from __future__ import annotations

import copy

import pytest
import yaml

from conftest import REPO, TINY, run_snakemake
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


def test_defaults_are_filled_into_a_copy(default_config):
    del default_config["regions"]["skip_bad_images"]
    del default_config["regions"]["torchvision"]
    del default_config["ablation"]
    given = copy.deepcopy(default_config)
    complete = validate_config(default_config)
    assert default_config == given  # validation leaves the config it checks alone
    assert complete["regions"]["skip_bad_images"] is False
    assert complete["regions"]["torchvision"] == {"backbone": "tiny", "weights": None, "representation_size": 1024, "categories": None}
    assert complete["finetune"]["tasks"]["gqa"]["weight_decay"] == 0.01
    assert complete["ablation"] == {"seeds": [0, 1, 2], "base_variant": "semvlp", "cross_layers": []}


def test_settings_take_every_schema_default_from_the_config():
    """One source of each default: where the schema has one, the settings classes the workflow builds
    have none of their own (which could drift from it); each task's settings class has exactly the
    keys of its section of the schema."""
    import dataclasses

    from semvlp.pretrain import PhaseSettings
    from semvlp.tasks import TASKS

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    common = schema["$defs"]["task"]["properties"]
    phase_defaults = {k for k, v in schema["properties"]["pretrain"]["properties"]["phase"]["properties"].items() if "default" in v}
    phase_defaults |= {"itm_sources"}  # pretrain.itm_sources, passed to the phase's settings
    tasks = schema["properties"]["finetune"]["properties"]["tasks"]["properties"]
    checks = [(PhaseSettings, phase_defaults, None)]
    for name, spec in TASKS.items():
        keys = {**common, **tasks[name].get("properties", {})}
        checks.append((spec.settings, {k for k, v in keys.items() if "default" in v}, set(keys)))
    for cls, defaults, keys in checks:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert defaults <= set(fields), f"{cls.__name__} lacks {defaults - set(fields)}"
        doubled = [n for n in defaults if fields[n].default is not dataclasses.MISSING or fields[n].default_factory is not dataclasses.MISSING]
        assert not doubled, f"{cls.__name__} has its own default for {doubled}"
        if keys is not None:  # every config key reaches the task, and the task reads no other
            assert set(fields) - {"seed", "max_text_length"} == keys, cls.__name__


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
        (lambda c: c["data"]["corpus"].update(sources=["coco_captions", "vg"]), "data.corpus.sources.1", "'vg' is not one of"),
        (lambda c: c["data"]["corpus"]["sources"].append("cc"), "data.corpus.sources.3", "'cc' needs image set 'cc', which regions.image_sets does not list"),
        (lambda c: c["regions"].update(features_from={"gqa": "vg"}), "regions.features_from.gqa", "also in regions.image_sets"),
        (lambda c: c["regions"].update(image_sets=["coco", "nlvr2", "flickr30k"], features_from={"gqa": "vg"}),
         "regions.features_from.gqa", "'vg' is not in regions.image_sets"),
        (lambda c: c["regions"].update(features_from={"gqa": "vgg"}), "regions.features_from.gqa", "'vgg' is not one of"),
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


@pytest.mark.parametrize(
    "override, lines",
    [
        ({"model": {"init": "/nonexistent/bert"}}, ["config key 'model.init': /nonexistent/bert: no such directory"]),
        (
            {"model": {"init": "half-bert"}},
            ["config key 'model.init': half-bert: no vocab.txt, no model.safetensors or pytorch_model.bin"],
        ),
        (
            {"regions": {"torchvision": {"weights": "models/detector.pt"}}},
            ["config key 'regions.torchvision.weights': models/detector.pt: no such file"],
        ),
        (
            {"regions": {"backend": "detectron2", "detectron2": {"config_file": "d2/faster_rcnn.yaml", "weights": "d2/model.pkl"}}},
            ["config key 'regions.detectron2.config_file': d2/faster_rcnn.yaml: no such file",
             "config key 'regions.detectron2.weights': d2/model.pkl: no such file"],
        ),
        (
            {"regions": {"backend": "tsv", "tsv": {s: f"tsv/{s}_obj36.tsv" for s in ("coco", "gqa", "nlvr2", "flickr30k")}},
             "data": {"corpus": {"sources": ["coco_captions", "vqa"]}}},
            ["config key 'regions.tsv.coco': tsv/coco_obj36.tsv: no such file"],
        ),
    ],
    ids=["init-missing", "init-incomplete", "torchvision-weights", "detectron2-files", "tsv-file"],
)
def test_paths_the_config_names_are_checked_before_any_job(tmp_path, override, lines):
    """Also for the generated default, where no data file is checked: each problem one line naming the key."""
    (tmp_path / "half-bert").mkdir()
    (tmp_path / "half-bert" / "config.json").write_text("{}\n")
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    result = run_snakemake(tmp_path, "results/all.tsv", "-n", "--configfile", str(tmp_path / "override.yaml"), timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    for line in lines:
        assert line in output, output[-3000:]
    assert "Job stats" not in output and not (tmp_path / "results").exists()


@pytest.mark.slow
def test_a_mistyped_model_init_stops_a_finished_run(tiny_run, tmp_path):
    """It used to say "Nothing to be done": the finished run's outputs hid the mistake."""
    (tmp_path / "override.yaml").write_text(yaml.safe_dump({"model": {"init": "/nonexistent/bert"}}))
    result = run_snakemake(tiny_run.workdir, "results/all.tsv", "-n", "--configfile", TINY, str(tmp_path / "override.yaml"), timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Nothing to be done" not in output
    assert "config key 'model.init': /nonexistent/bert: no such directory" in output.splitlines()
