# Results tables: the tidy TSV and the paper-style markdown table.


rule report:
    input:
        finetune_outputs(config["report"]["variants"]),
    output:
        tsv="results/all.tsv",
        markdown="results/all.md",
    params:
        variants=config["report"]["variants"],
        tasks=TASKS,
        seeds=SEEDS,
        code=CODE["report"],
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
        finetune_outputs(ablation_variants(config), config["ablation"]["seeds"]),
    output:
        tsv="results/ablation.tsv",
        markdown="results/ablation.md",
    params:
        variants=ablation_variants(config),
        tasks=TASKS,
        seeds=config["ablation"]["seeds"],
        code=CODE["report"],
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
