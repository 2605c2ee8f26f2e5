# The image-text data: the embedded world (when generated here), the pre-training corpus, the tokenizer.


if config["data"].get("generate"):

    rule generate_world:
        output:
            manifest=f"{DATA_ROOT}/MANIFEST.json",
            files=[str(path) for path in layout.embedded_files(DATA_ROOT)],
            images=[directory(str(layout.image_dir(DATA_ROOT, s))) for s in layout.EMBEDDED_IMAGE_SETS],
        params:
            spec=config["data"]["generate"],
            root=lambda wildcards, output: os.path.dirname(output.manifest),
            code=code("generate_world"),
        log:
            "results/logs/generate_world.log",
        benchmark:
            "results/benchmarks/generate_world.tsv"
        resources:
            **rule_resources("generate_world", mem_mb=2000, runtime=10),
        conda:
            ENV
        script:
            RUN_JOB


rule build_corpus:
    input:
        **corpus_inputs(),
        held_out=sorted({path for by_split in held_out().values() for path in by_split.values()}),
    output:
        corpus="results/corpus/pretrain.jsonl",
        answers="results/corpus/answers.json",
        summary=report("results/corpus/summary.json", caption="../report/corpus.rst", category="data", labels={"file": "corpus summary"}),
    params:
        corpus=config["data"]["corpus"],
        held_out=held_out(),
        code=code("build_corpus"),
    log:
        "results/logs/build_corpus.log",
    benchmark:
        "results/benchmarks/build_corpus.tsv"
    resources:
        **rule_resources("build_corpus", mem_mb=4000, runtime=30),
    conda:
        ENV
    script:
        RUN_JOB


rule train_tokenizer:
    input:
        corpus="results/corpus/pretrain.jsonl",
    output:
        "results/tokenizer/vocab.txt",
    params:
        vocab_size=config["model"]["vocab_size"],
        code=code("train_tokenizer"),
    log:
        "results/logs/train_tokenizer.log",
    benchmark:
        "results/benchmarks/train_tokenizer.tsv"
    resources:
        **rule_resources("train_tokenizer", mem_mb=2000, runtime=10),
    conda:
        ENV
    script:
        RUN_JOB
