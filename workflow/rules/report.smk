# Results: the reported variants' models (shareable, with a model card), the tidy TSV, the
# paper-style markdown table, the results figure and the provenance of it all (the report's tables).


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
        figures=figure_outputs(config["report"]["variants"]),
    output:
        tsv=report("results/all.tsv", caption="../report/all.rst", category="results", labels={"table": "all.tsv (every run)"}),
        markdown=report("results/all.md", caption="../report/all.rst", category="results", labels={"table": "all.md (paper table)"}),
        figure=report("results/figures/results.png", caption="../report/results.rst", category="results", labels={"table": "figure"}),
        provenance=report("results/provenance.tsv", caption="../report/provenance.rst", category="results", labels={"table": "provenance"}),
        config=report("results/config.yaml", caption="../report/provenance.rst", category="results", labels={"table": "config"}),
    params:
        variants=config["report"]["variants"],
        tasks=TASKS,
        seeds=SEEDS,
        checkpoints=pretrain_checkpoints(config["report"]["variants"]),
        config=config_without_tracking(),
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
        figures=pretraining_figures(ablation_variants(config)),
    output:
        tsv=report("results/ablation.tsv", caption="../report/ablation.rst", category="results", labels={"table": "ablation.tsv (every run)"}),
        markdown=report("results/ablation.md", caption="../report/ablation.rst", category="results", labels={"table": "ablation.md"}),
        figure=report("results/figures/ablation.png", caption="../report/ablation.rst", category="results", labels={"table": "ablation figure"}),
        provenance=report("results/ablation_provenance.tsv", caption="../report/provenance.rst", category="results", labels={"table": "ablation provenance"}),
        config=report("results/ablation_config.yaml", caption="../report/provenance.rst", category="results", labels={"table": "ablation config"}),
    params:
        variants=ablation_variants(config),
        tasks=TASKS,
        seeds=config["ablation"]["seeds"],
        checkpoints=pretrain_checkpoints(ablation_variants(config)),
        config=config_without_tracking(),
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
