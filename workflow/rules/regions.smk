# Region features: detector training (embedded default), sharded extraction and the store index over the
# shards (no feature copied), or TSV import.

REGIONS = config["regions"]
BACKEND = REGIONS["backend"]


if BACKEND == "torchvision" and REGIONS["torchvision"]["weights"] is None:

    rule train_detector:
        input:
            instances=str(layout.coco_instances(DATA_ROOT, "train2014")),
            images=str(layout.image_dir(DATA_ROOT, "coco")),
        output:
            "results/detector/detector.pt",
        params:
            train=REGIONS["train_detector"],
            torchvision=REGIONS["torchvision"],
            code=code("train_detector"),
        log:
            "results/logs/train_detector.log",
        benchmark:
            "results/benchmarks/train_detector.tsv"
        threads: 2
        resources:
            **rule_resources("train_detector", mem_mb=4000, runtime=60),
        conda:
            ENV
        script:
            RUN_JOB


if BACKEND == "tsv":

    rule import_tsv_features:
        input:
            lambda wildcards: REGIONS["tsv"][wildcards.image_set],
        output:
            features("{image_set}"),
        params:
            feature_dtype=REGIONS["feature_dtype"],
            code=code("import_tsv_features"),
        log:
            "results/logs/import_tsv_features/{image_set}.log",
        benchmark:
            "results/benchmarks/import_tsv_features/{image_set}.tsv"
        priority: FEATURES_PRIORITY
        resources:
            **rule_resources("import_tsv_features", mem_mb=2000, runtime=120),
        conda:
            ENV
        script:
            RUN_JOB

else:

    rule extract_regions:
        input:
            images=lambda wildcards: store_image_dirs(wildcards.image_set),
            weights=detector_weights(),
        output:
            "results/features/{image_set}/shard{shard}.h5",
        params:
            regions=extraction_config(config),
            feature_dtype=REGIONS["feature_dtype"],
            skip_bad_images=REGIONS["skip_bad_images"],
            batch_size=REGIONS["batch_size"],
            num_shards=REGIONS["shards"],
            code=code("extract_regions"),
        log:
            "results/logs/extract_regions/{image_set}/shard{shard}.log",
        benchmark:
            "results/benchmarks/extract_regions/{image_set}/shard{shard}.tsv"
        priority: FEATURES_PRIORITY
        resources:
            # on the job's GPU when it has one; loader_workers decode images meanwhile (no rerun trigger:
            # every count gives the same features)
            **rule_resources("extract_regions", mem_mb=4000, runtime=240, gpu=0, loader_workers=0),
        conda:
            ENV
        script:
            RUN_JOB

    # the image set's store: a small index file whose per-box datasets point into the shards
    rule index_regions:
        input:
            expand("results/features/{{image_set}}/shard{shard}.h5", shard=range(REGIONS["shards"])),
        output:
            features("{image_set}"),
        params:
            code=code("index_regions"),
        log:
            "results/logs/index_regions/{image_set}.log",
        benchmark:
            "results/benchmarks/index_regions/{image_set}.tsv"
        priority: FEATURES_PRIORITY
        resources:
            **rule_resources("index_regions", mem_mb=2000, runtime=60),
        conda:
            ENV
        script:
            RUN_JOB
