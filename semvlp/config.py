"""Workflow configuration: schema validation with one clear message, defaults, derived values."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Callable

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config value is wrong; the message names the key (dotted path) and the problem."""


def _key_path(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _with_defaults(validator_class):
    """A validator class that also fills in each property's schema `default` where it is missing."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


# Keys a later version renamed: what to write instead.
RENAMED_KEYS = {"train_split": "renamed to train_splits, a list of splits trained on together"}


def _describe(error: jsonschema.ValidationError) -> str:
    """One line naming the offending key; unknown keys are named themselves, not their parent."""
    path = list(error.absolute_path)
    if error.validator in ("additionalProperties", "unevaluatedProperties"):
        # jsonschema names the unexpected keys in its message: "('a', 'b' were unexpected)"
        unexpected = re.search(r"\((.*) (?:was|were) unexpected\)", error.message)
        if unexpected:
            first = re.findall(r"'([^']*)'", unexpected.group(1))[0]
            return f"config key '{_key_path(path + [first])}': unknown key ({RENAMED_KEYS.get(first, 'not in the schema')})"
    if error.validator == "required":
        return f"config key '{_key_path(path)}': {error.message}"
    if error.validator == "propertyNames":
        return f"config key '{_key_path(path)}': invalid name {error.instance!r} ({error.message})"
    return f"config key '{_key_path(path)}': {error.message}"


def validate_config(config: dict[str, Any], schema_path: str | Path = SCHEMA_PATH) -> dict[str, Any]:
    """Check `config` against the schema and the rules a schema cannot say; return the complete config:
    a copy with the schema's defaults filled in and the ablation's sweep variants added. The schema is
    the one place of every default; `config` itself is left as it was.

    Raises ConfigError with one message naming the first offending key.
    """
    schema = yaml.safe_load(Path(schema_path).read_text())
    config = copy.deepcopy(config)
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        # A renamed key first: its message says what to write instead. Otherwise the deepest error: it
        # names the exact key rather than an enclosing object.
        renamed = [e for e in errors if "unexpected" in e.message and any(f"'{key}'" in e.message for key in RENAMED_KEYS)]
        raise ConfigError(_describe(renamed[0] if renamed else max(errors, key=lambda e: len(e.absolute_path))))
    _check_relations(config)
    return config


def _check_relations(config: dict[str, Any]) -> None:
    def fail(key: str, problem: str):
        raise ConfigError(f"config key '{key}': {problem}")

    gen = config["data"].get("generate")
    if gen and gen["min_objects"] > gen["max_objects"]:
        fail("data.generate.min_objects", f"{gen['min_objects']} is larger than max_objects {gen['max_objects']}")
    sel = config["regions"]["selection"]
    if sel["min_boxes"] > sel["max_boxes"]:
        fail("regions.selection.min_boxes", f"{sel['min_boxes']} is larger than max_boxes {sel['max_boxes']}")
    backend = config["regions"]["backend"]
    if backend not in config["regions"] and backend != "torchvision":
        fail(f"regions.{backend}", f"backend '{backend}' needs a regions.{backend} section")
    if backend == "tsv":
        missing = [s for s in config["regions"]["image_sets"] if s not in config["regions"]["tsv"]]
        if missing:
            fail(f"regions.tsv.{missing[0]}", "no TSV file named for this image set")
    if backend == "torchvision":
        if config["regions"]["torchvision"]["weights"] is None and "train_detector" not in config["regions"]:
            fail("regions.torchvision.weights", "null (train a detector) needs a regions.train_detector section")
    _check_image_sets(config, fail)
    _check_tasks(config, fail)
    model = config["model"]
    if model["hidden_size"] % model["num_heads"]:
        fail("model.num_heads", f"{model['num_heads']} does not divide hidden_size {model['hidden_size']}")
    for name, variant in config["pretrain"]["variants"].items():
        k = variant.get("model", {}).get("cross_layers", model["cross_layers"])
        if k > model["num_layers"]:
            key = f"pretrain.variants.{name}.model.cross_layers" if "model" in variant else "model.cross_layers"
            fail(key, f"{k} cross-attention layers but the model has {model['num_layers']} layers")
    phase = config["pretrain"]["phase"]
    processes = int(config.get("resources", {}).get("pretrain_phase", {}).get("gpu", 0)) or 1
    if phase["batch_size"] % (processes * phase["accumulation_steps"]):
        fail(
            "pretrain.phase.batch_size",
            f"{phase['batch_size']} does not split over {processes} GPU processes (resources.pretrain_phase.gpu) "
            f"x {phase['accumulation_steps']} accumulation steps (pretrain.phase.accumulation_steps)",
        )
    for i, variant in enumerate(config["report"]["variants"]):
        if variant not in config["pretrain"]["variants"]:
            fail(f"report.variants.{i}", f"'{variant}' is not a variant in pretrain.variants")
    ablation = config["ablation"]
    if ablation["cross_layers"] and ablation["base_variant"] not in config["pretrain"]["variants"]:
        fail("ablation.base_variant", f"'{ablation['base_variant']}' is not a variant in pretrain.variants")
    for i, k in enumerate(ablation["cross_layers"]):
        if k > model["num_layers"]:
            fail(f"ablation.cross_layers.{i}", f"{k} cross-attention layers but the model has {model['num_layers']} layers")
    _add_sweep_variants(config)


def _check_image_sets(config: dict[str, Any], fail: Callable[[str, str], None]) -> None:
    """Every image set the corpus reads has a feature store: extracted, or read from another set's."""
    from semvlp.data.corpus import SOURCE_IMAGE_SET

    regions = config["regions"]
    extracted = set(regions["image_sets"])
    for image_set, store in regions["features_from"].items():
        key = f"regions.features_from.{image_set}"
        if image_set in extracted:
            fail(key, f"'{image_set}' is also in regions.image_sets; its images would be extracted twice")
        if store not in extracted:
            fail(key, f"'{store}' is not in regions.image_sets, so it has no feature store to read '{image_set}' from")
    for i, source in enumerate(config["data"]["corpus"]["sources"]):
        image_set = SOURCE_IMAGE_SET[source]
        if image_set not in extracted and image_set not in regions["features_from"]:
            fail(f"data.corpus.sources.{i}", f"'{source}' needs image set '{image_set}', which regions.image_sets does not list")


def _check_tasks(config: dict[str, Any], fail: Callable[[str, str], None]) -> None:
    """What each task's settings class checks itself, and a feature store for every image set it reads."""
    from semvlp.tasks import TASKS

    regions = config["regions"]
    stores = {*regions["image_sets"], *regions["features_from"]}
    for task, section in config["finetune"]["tasks"].items():
        spec = TASKS[task]
        for key, problem in spec.settings.problems(section):
            fail(f"finetune.tasks.{task}.{key}", problem)
        for image_set in spec.image_sets(section):
            if image_set not in stores:
                fail(f"finetune.tasks.{task}", f"reads image set '{image_set}', which regions.image_sets does not list")


def _add_sweep_variants(config: dict[str, Any]) -> None:
    """The ablation's sweep of k: `{base}_k{k}` variants with the base schedule and k cross layers."""
    ablation = config["ablation"]
    variants = config["pretrain"]["variants"]
    for k in ablation["cross_layers"]:
        base = variants[ablation["base_variant"]]
        variants.setdefault(
            f"{ablation['base_variant']}_k{k}", {"phases": list(base["phases"]), "model": {**base.get("model", {}), "cross_layers": k}}
        )


# What a model.init directory must hold: a BERT-family checkpoint in transformers format.
BERT_FILES = ("config.json", "vocab.txt")
BERT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def path_problems(config: dict[str, Any]) -> list[str]:
    """Every file or folder the config names outside the data root that is not there, one line each
    ("config key 'K': PATH: problem"), so the workflow stops before any job (data files: layout)."""
    problems = []

    def need(key: str, path, kind: str = "file") -> bool:
        path = Path(path)
        exists = path.is_dir() if kind == "directory" else path.is_file()
        if not exists:
            problems.append(f"config key '{key}': {path}: no such {kind}")
        return exists

    init = config["model"]["init"]
    if init != "scratch" and need("model.init", init, "directory"):
        missing = [name for name in BERT_FILES if not (Path(init) / name).is_file()]
        if not any((Path(init) / name).is_file() for name in BERT_WEIGHTS):
            missing.append(" or ".join(BERT_WEIGHTS))
        if missing:
            problems.append(
                f"config key 'model.init': {init}: no {', no '.join(missing)} "
                f"(\"scratch\" or a BERT-family checkpoint directory in transformers format)"
            )
    regions = config["regions"]
    if regions["backend"] == "torchvision" and regions["torchvision"]["weights"] is not None:
        need("regions.torchvision.weights", regions["torchvision"]["weights"])
    if regions["backend"] == "detectron2":
        for key in ("config_file", "weights"):
            need(f"regions.detectron2.{key}", regions["detectron2"][key])
    if regions["backend"] == "tsv":
        for image_set in regions["image_sets"]:
            need(f"regions.tsv.{image_set}", regions["tsv"][image_set])
    for task, section in config["finetune"]["tasks"].items():
        if section.get("held_out_images") is not None:
            need(f"finetune.tasks.{task}.held_out_images", section["held_out_images"])
    return problems


def ablation_variants(config: dict[str, Any]) -> list[str]:
    """Every variant of the config, the sweep's included (validate_config adds those)."""
    return list(config["pretrain"]["variants"])


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    config = yaml.safe_load(path.read_text())
    return validate_config(config)


def extraction_config(config: dict[str, Any]) -> dict[str, Any]:
    """What of the `regions` section the region extractor reads (the extract_regions rule's param; see
    semvlp.regions.extract.extractor_settings): the backend, its section, the box selection."""
    regions = config["regions"]
    return {key: regions[key] for key in ("backend", regions["backend"], "selection") if key in regions}


def variant_model_config(config: dict[str, Any], variant: str) -> dict[str, Any]:
    """The model section with the variant's overrides applied."""
    model = dict(config["model"])
    model.update(config["pretrain"]["variants"][variant].get("model", {}))
    return model
