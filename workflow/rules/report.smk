# Results: the reported variants' models (shareable, with a model card), the tidy TSV and the
# paper-style markdown table.


rule export_model:
    input:
        checkpoint=final_checkpoint,
        tokenizer=tokenizer_vocab(),
        finetune=lambda wildcards: finetune_outputs([wildcards.variant]),
    output:
        directory("results/models/{variant}"),
    params:
        recipe=model_recipe,
        code=code("export_model"),
    log:
        "results/logs/export_model/{variant}.log",
    benchmark:
        "results/benchmarks/export_model/{variant}.tsv"
    resources:
        **rule_resources("export_model", mem_mb=2000, runtime=10),
    conda:
        ENV
    script:
        RUN_JOB


rule report:
    input:
        metrics=finetune_outputs(config["report"]["variants"]),
        models=expand("results/models/{variant}", variant=config["report"]["variants"]),
    output:
        tsv="results/all.tsv",
        markdown="results/all.md",
    params:
        variants=config["report"]["variants"],
        tasks=TASKS,
        seeds=SEEDS,
        code=code("report"),
    log:
        "results/logs/report.log",
    benchmark:
        "results/benchmarks/report.tsv"
    resources:
        **rule_resources("report", mem_mb=1000, runtime=10),
    conda:
        ENV
    script:
        RUN_JOB


rule ablation_report:
    input:
        metrics=finetune_outputs(ablation_variants(config), config["ablation"]["seeds"]),
    output:
        tsv="results/ablation.tsv",
        markdown="results/ablation.md",
    params:
        variants=ablation_variants(config),
        tasks=TASKS,
        seeds=config["ablation"]["seeds"],
        code=code("ablation_report"),
    log:
        "results/logs/ablation_report.log",
    benchmark:
        "results/benchmarks/ablation_report.tsv"
    resources:
        **rule_resources("ablation_report", mem_mb=1000, runtime=10),
    conda:
        ENV
    script:
        RUN_JOB
