# Fine-tuning and evaluation: one job per (variant, task, seed), from the variant's last checkpoint.
# Each job keeps its model (model/: `semvlp predict` predicts other splits with it).


rule finetune:
    input:
        unpack(task_inputs),
        unpack(task_features),
        checkpoint=final_checkpoint,
        tokenizer=tokenizer_vocab(),
    output:
        metrics="results/finetune/{variant}/{task}/seed{seed}/metrics.json",
        model=directory("results/finetune/{variant}/{task}/seed{seed}/model"),
    params:
        task_config=lambda wildcards: config["finetune"]["tasks"][wildcards.task],
        max_text_length=config["model"]["max_text_length"],
        code=task_code,
    log:
        "results/logs/finetune/{variant}/{task}/seed{seed}.log",
    benchmark:
        "results/benchmarks/finetune/{variant}/{task}/seed{seed}.tsv"
    # one thread: two fine-tunings side by side finish sooner than one after the other on two threads
    threads: 1
    # longest first, so that the run does not end on one core with a long job while the other idles
    priority: lambda wildcards: FINETUNE_PRIORITY[wildcards.task]
    resources:
        **rule_resources("finetune", mem_mb=8000, runtime=600, gpu=0),
    conda:
        ENV
    script:
        RUN_JOB
