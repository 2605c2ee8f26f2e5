# Pre-training: one initial checkpoint per variant, then one job per phase of the variant's schedule,
# each starting from the previous phase's checkpoint.


rule init_model:
    input:
        tokenizer=tokenizer_vocab(),
        answers="results/corpus/answers.json",
        **pretrain_features(),
    output:
        "results/pretrain/{variant}/phase0.safetensors",
    params:
        model=lambda wildcards: variant_model_config(config, wildcards.variant),
        seed=config["pretrain"]["seed"],
        code=code("init_model"),
    log:
        "results/logs/init_model/{variant}.log",
    benchmark:
        "results/benchmarks/init_model/{variant}.tsv"
    # Two threads and first in line like the phases, although it needs neither: on 2 cores the one-thread
    # fine-tunings of `none` could otherwise take the core that the first phase waits for (see below).
    threads: 2
    priority: CHAIN_PRIORITY
    resources:
        **rule_resources("init_model", mem_mb=2000, runtime=10),
    conda:
        ENV
    script:
        RUN_JOB


rule pretrain_phase:
    input:
        checkpoint=previous_checkpoint,
        corpus="results/corpus/pretrain.jsonl",
        answers="results/corpus/answers.json",
        tokenizer=tokenizer_vocab(),
        **pretrain_features(),
    output:
        checkpoint="results/pretrain/{variant}/phase{index}.safetensors",
        metrics="results/pretrain/{variant}/phase{index}.metrics.json",
    wildcard_constraints:
        index=r"[1-9]\d*",  # phase0 is the initial checkpoint (rule init_model)
    params:
        mode=phase_mode,
        # the schedule up to this phase: changing a later phase leaves this one alone
        schedule=lambda wildcards: schedule(wildcards.variant)[: int(wildcards.index)],
        phase=config["pretrain"]["phase"],
        masking=config["pretrain"]["masking"],
        itm_mismatch_ratio=config["pretrain"]["itm_mismatch_ratio"],
        itm_sources=config["pretrain"]["itm_sources"],
        loss_weights=config["pretrain"]["loss_weights"],
        seed=config["pretrain"]["seed"],
        max_text_length=config["model"]["max_text_length"],
        code=code("pretrain_phase"),
    log:
        "results/logs/pretrain_phase/{variant}/phase{index}.log",
    benchmark:
        "results/benchmarks/pretrain_phase/{variant}/phase{index}.tsv"
    # Two threads, first in line: the phases are the run's longest chain. A two-thread job waits for two
    # free cores at once, and on 2 cores every core that came free used to go to a one-thread fine-tuning
    # of `none` (4.6 minutes before the first phase). Now nothing with a lower priority can start while
    # the chain runs: init_model also takes both cores, so when it ends both are free for phase 1, and
    # each phase frees both for the next. Other machines: --set-threads pretrain_phase=N.
    threads: 2
    priority: CHAIN_PRIORITY
    resources:
        # loader_*: DataLoader workers building batches (per GPU process); not a rerun trigger, as
        # every setting gives the same batches. paper.yaml sets them under resources.pretrain_phase.
        **rule_resources("pretrain_phase", mem_mb=8000, runtime=600, gpu=0, loader_workers=0, loader_prefetch=2),
    conda:
        ENV
    script:
        RUN_JOB
