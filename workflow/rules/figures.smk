# Figures, each drawn by one semvlp.figures function from a job's outputs; shown by the Snakemake report
# (`snakemake --report results/report.zip`) and logged to MLflow. The report rule takes them as
# inputs, so `results/all.tsv` draws them all.


rule figure_pretraining:
    input:
        phase_metrics,
    output:
        curves=report(
            "results/figures/pretraining/{variant}.png",
            caption="../report/pretraining.rst", category="pre-training", subcategory="losses", labels={"variant": "{variant}"},
        ),
        grounding=report(
            "results/figures/grounding/{variant}.png",
            caption="../report/grounding.rst", category="pre-training", subcategory="grounding", labels={"variant": "{variant}"},
        ),
    params:
        code=code("figure_pretraining"),
    log:
        "results/logs/figures/pretraining/{variant}.log",
    benchmark:
        "results/benchmarks/figures/pretraining/{variant}.tsv"
    resources:
        **rule_resources("figures", mem_mb=1000, runtime=10),
    conda:
        ENV
    script:
        RUN_JOB


rule figure_finetuning:
    input:
        metrics=finetune_outputs(config["report"]["variants"]),
    output:
        report("results/figures/finetuning.png", caption="../report/finetuning.rst", category="fine-tuning", labels={"figure": "training loss"}),
    params:
        code=code("figure_finetuning"),
    log:
        "results/logs/figures/finetuning.log",
    benchmark:
        "results/benchmarks/figures/finetuning.tsv"
    resources:
        **rule_resources("figures", mem_mb=1000, runtime=10),
    conda:
        ENV
    script:
        RUN_JOB


rule figure_vqa:
    input:
        unpack(vqa_figure_inputs),
        metrics=expand("results/finetune/{variant}/vqa/seed{seed}/metrics.json", variant=config["report"]["variants"], seed=SEEDS),
    output:
        report("results/figures/vqa.png", caption="../report/vqa.rst", category="fine-tuning", labels={"figure": "VQA by type"}),
    params:
        code=code("figure_vqa"),
    log:
        "results/logs/figures/vqa.log",
    benchmark:
        "results/benchmarks/figures/vqa.tsv"
    resources:
        **rule_resources("figures", mem_mb=2000, runtime=10),
    conda:
        ENV
    script:
        RUN_JOB


rule figure_retrieval:
    input:
        dataset=str(layout.flickr30k_dataset(DATA_ROOT)),
        metrics=expand("results/finetune/{variant}/retrieval/seed{seed}/metrics.json", variant=config["report"]["variants"], seed=SEEDS),
    output:
        report("results/figures/retrieval.png", caption="../report/retrieval.rst", category="fine-tuning", labels={"figure": "retrieval R@K"}),
    params:
        code=code("figure_retrieval"),
    log:
        "results/logs/figures/retrieval.log",
    benchmark:
        "results/benchmarks/figures/retrieval.tsv"
    resources:
        **rule_resources("figures", mem_mb=2000, runtime=10),
    conda:
        ENV
    script:
        RUN_JOB


rule figure_detections:
    input:
        stores=[features(image_set) for image_set in IMAGE_SETS],
        images=[folder for image_set in IMAGE_SETS for folder in store_image_dirs(image_set)],
    output:
        report("results/figures/detections.png", caption="../report/detections.rst", category="regions", labels={"figure": "detections"}),
    params:
        image_sets=IMAGE_SETS,
        image_dirs={image_set: store_image_dirs(image_set) for image_set in IMAGE_SETS},
        code=code("figure_detections"),
    log:
        "results/logs/figures/detections.log",
    benchmark:
        "results/benchmarks/figures/detections.tsv"
    resources:
        **rule_resources("figures", mem_mb=2000, runtime=10),
    conda:
        ENV
    script:
        RUN_JOB


rule figure_detector:
    input:
        "results/detector/detector.pt",
    output:
        report("results/figures/detector.png", caption="../report/detector.rst", category="regions", labels={"figure": "detector training"}),
    params:
        code=code("figure_detector"),
    log:
        "results/logs/figures/detector.log",
    benchmark:
        "results/benchmarks/figures/detector.tsv"
    resources:
        **rule_resources("figures", mem_mb=1000, runtime=10),
    conda:
        ENV
    script:
        RUN_JOB
