# SemVLP workflow: images -> region features -> alternating pre-training -> fine-tuning -> results tables.
# Thin entry point: config, validation, rule files. All logic lives in the `semvlp` package.

from snakemake.exceptions import WorkflowError
from semvlp import tracking
from semvlp.config import ConfigError, path_problems, validate_config
from semvlp.data.requirements import missing_files_message


# The embedded default; --configfile adds overrides on top of it (config/tiny.yaml, config/paper.yaml).
configfile: workflow.source_path("config/config.yaml")


try:
    complete = validate_config(config, workflow.source_path("workflow/schemas/config.schema.yaml"))
except ConfigError as err:
    raise WorkflowError(str(err)) from None
# the rules (and the jobs' view of the config) read the complete config: the schema's defaults filled in
config.update(complete)

# Stop before any job if a file the config names is not there (model.init, detector files, TSVs) or,
# with real data (nothing generated here), an official data file is missing.
problems = path_problems(config)
if not config["data"].get("generate") and (missing := missing_files_message(config)):
    problems.append(missing)
if problems:
    raise WorkflowError("\n".join(problems))


wildcard_constraints:
    image_set="|".join(config['regions']['image_sets']),
    variant="[A-Za-z0-9_-]+",
    task="|".join(config["finetune"]["tasks"]),
    seed=r"\d+",
    index=r"\d+",
    shard=r"\d+",


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/regions.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/report.smk"


# `snakemake --report results/report.zip`: this description, then the outputs marked report() (figures,
# tables), by category.
report: "workflow/report/workflow.rst"


rule all:
    input:
        "results/all.tsv",
        "results/all.md",
    default_target: True


# Tracking settings are read from the config by the jobs, not passed as params: where runs are logged
# changes no result, so it must not make Snakemake rerun anything.
onstart:
    tracking.begin_invocation(config, targets=sorted(workflow.dag_settings.targets))


onsuccess:
    tracking.end_invocation(config, success=True)


onerror:
    tracking.end_invocation(config, success=False)
