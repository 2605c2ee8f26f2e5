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
    conda:
        ENV
    script:
        RUN_JOB
