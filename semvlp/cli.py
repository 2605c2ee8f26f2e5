"""The `semvlp` command: the workflow's stages and tools for use outside Snakemake.

    semvlp evaluate vqa --questions Q.json --annotations A.json --predictions P.json
    semvlp evaluate vqa --questions test-dev2015_questions.json --predictions P.json --check-only
    semvlp evaluate gqa --questions Q.json --predictions P.json
    semvlp evaluate nlvr2 --data D.jsonl --predictions P.csv
    semvlp evaluate retrieval --dataset dataset_flickr30k.json --split test --scores S.npy
    semvlp features import-tsv IN.tsv OUT.h5      semvlp features export-tsv IN.h5 OUT.tsv
    semvlp features info FILE.h5
    semvlp data generate ROOT [--seed N]           semvlp config validate CONFIG.yaml
    semvlp data corpus ROOT OUT.jsonl --sources coco_captions vg_captions cc [--held-out vqa:val2014 ...]
    semvlp predict vqa --model results/finetune/semvlp/vqa/seed0/model --data-root ROOT --split test2015
        --features results/features/coco.h5 --out DIR [--evaluate]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from semvlp.data.corpus import CORPUS_SOURCES
from semvlp.errors import InputError
from semvlp.tasks import TASKS


def _evaluate(args) -> dict:
    from semvlp import metrics

    if getattr(args, "check_only", False):
        if args.task == "vqa":
            result = metrics.check_vqa_predictions(args.questions, args.predictions)
        elif args.task == "gqa":
            result = metrics.check_gqa_predictions(args.questions, args.predictions)
        else:
            result = metrics.check_nlvr2_predictions(args.data, args.predictions)
        return {**result, "predictions": str(args.predictions), "valid": True}
    if args.task == "vqa":
        if args.annotations is None:
            raise InputError("needs --annotations to score (or --check-only for a test split)", args.questions)
        return metrics.evaluate_vqa(args.questions, args.annotations, args.predictions, legacy_normalization=args.legacy_normalization)
    if args.task == "gqa":
        return metrics.evaluate_gqa(args.questions, args.predictions)
    if args.task == "nlvr2":
        return metrics.evaluate_nlvr2(args.data, args.predictions)
    return metrics.evaluate_retrieval(args.dataset, args.split, args.scores)


def _features(args) -> dict:
    from semvlp import features

    if args.action == "import-tsv":
        count = features.import_tsv(args.src, args.dst, feature_dtype=args.feature_dtype)
        return {"images": count, "output": str(args.dst)}
    if args.action == "export-tsv":
        return {"images": features.export_tsv(args.src, args.dst), "output": str(args.dst)}
    reader = features.FeatureReader(args.src)
    return {"images": len(reader), "max_boxes": reader.max_boxes, "feature_dim": reader.feature_dim, "provenance": reader.provenance}


def _data(args) -> dict:
    if args.action == "corpus":
        return _corpus(args)
    from semvlp.data.world import WorldSpec, generate_world

    return generate_world(Path(args.root), WorldSpec(seed=args.seed))


def _corpus(args) -> dict:
    from semvlp.data.corpus import build_corpus, write_corpus

    held_out: dict[str, list[str]] = {}
    for task, split in args.held_out:
        held_out.setdefault(task, []).append(split)
    built = build_corpus(
        args.root, args.sources, min_answer_count=args.min_answer_count, coco_splits=args.coco_splits,
        gqa_splits=args.gqa_splits, held_out=held_out,
    )
    answers = args.answers or args.out.with_name("answers.json")
    write_corpus(built.records, built.table, args.out, answers)
    return {**built.summary(), "output": str(args.out), "answers_file": str(answers)}


def _held_out_split(value: str) -> tuple[str, str]:
    from semvlp.data.corpus import HELD_OUT_TASKS

    task, colon, split = value.partition(":")
    if not colon or not split or task not in HELD_OUT_TASKS:
        raise argparse.ArgumentTypeError(f"{value!r}: expected TASK:SPLIT with TASK one of {', '.join(HELD_OUT_TASKS)}")
    return task, split


def _config(args) -> dict:
    from semvlp.config import load_config

    load_config(args.config)
    return {"config": str(args.config), "valid": True}


def _predict(args) -> dict:
    from semvlp.tasks import task_spec
    from semvlp.tasks.runner import predict_task

    spec = task_spec(args.task)
    return predict_task(
        args.model, task=args.task, split=args.split, files=spec.split_files(args.data_root, args.split),
        feature_paths={spec.image_set: args.features}, out_dir=args.out, evaluate=args.evaluate,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semvlp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser("evaluate", help="official metrics on saved predictions; prints one JSON object")
    tasks = evaluate.add_subparsers(dest="task", required=True)
    vqa = tasks.add_parser("vqa", help="VQA accuracy (official vqaEval.py: leave-one-annotator-out, answer normalisation)")
    vqa.add_argument("--questions", required=True, type=Path)
    vqa.add_argument("--annotations", type=Path, help="the split's annotations (not with --check-only)")
    vqa.add_argument("--predictions", required=True, type=Path)
    vqa.add_argument("--check-only", action="store_true", help="check a test-server file without scoring it: every id of the split once, predictions as strings")
    vqa.add_argument(
        "--legacy-normalization", action="store_true",
        help="normalise answers as the official vqaEval.py did before a013f00 (2021); the default follows it as it stands",
    )
    gqa = tasks.add_parser("gqa", help="GQA exact-match accuracy")
    gqa.add_argument("--questions", required=True, type=Path)
    gqa.add_argument("--predictions", required=True, type=Path)
    gqa.add_argument("--check-only", action="store_true", help="check a test-server file without scoring it: every id of the split once, predictions as strings")
    nlvr2 = tasks.add_parser("nlvr2", help="NLVR2 accuracy and consistency")
    nlvr2.add_argument("--data", required=True, type=Path)
    nlvr2.add_argument("--predictions", required=True, type=Path)
    nlvr2.add_argument("--check-only", action="store_true", help="check a test-server file without scoring it: every id of the split once, predictions as strings")
    retrieval = tasks.add_parser("retrieval", help="Flickr30K retrieval recall (text->image, image->text)")
    retrieval.add_argument("--dataset", required=True, type=Path)
    retrieval.add_argument("--split", default="test")
    retrieval.add_argument("--scores", required=True, type=Path, help=".npy, one row per caption, one column per image")
    evaluate.set_defaults(func=_evaluate)

    feats = commands.add_parser("features", help="HDF5 region-feature files and LXMERT TSV interop")
    actions = feats.add_subparsers(dest="action", required=True)
    imp = actions.add_parser("import-tsv", help="LXMERT TSV -> HDF5 (streams; memory independent of file size)")
    imp.add_argument("src", type=Path)
    imp.add_argument("dst", type=Path)
    imp.add_argument("--feature-dtype", choices=["float32", "float16"], default="float32")
    exp = actions.add_parser("export-tsv", help="HDF5 -> LXMERT TSV")
    exp.add_argument("src", type=Path)
    exp.add_argument("dst", type=Path)
    info = actions.add_parser("info", help="size and provenance of an HDF5 feature file")
    info.add_argument("src", type=Path)
    feats.set_defaults(func=_features)

    data = commands.add_parser("data", help="the embedded image-text world; the pre-training corpus")
    data_actions = data.add_subparsers(dest="action", required=True)
    gen = data_actions.add_parser("generate", help="write the embedded world (default sizes) in the public formats")
    gen.add_argument("root", type=Path)
    gen.add_argument("--seed", type=int, default=0)
    corpus = data_actions.add_parser(
        "corpus", help="the pre-training corpus file the workflow's build_corpus writes; the last line counts records by source",
    )
    corpus.add_argument("root", type=Path, help="the official files, named as data.root has them")
    corpus.add_argument("out", type=Path, help="the corpus (jsonl)")
    corpus.add_argument("--sources", nargs="+", required=True, choices=CORPUS_SOURCES)
    corpus.add_argument("--min-answer-count", type=int, default=1, help="QA answers seen less often leave the answer table")
    corpus.add_argument("--coco-splits", nargs="+", default=["train2014"], help="COCO captions and VQA splits")
    corpus.add_argument("--gqa-splits", nargs="+", default=["train"])
    corpus.add_argument(
        "--held-out", nargs="+", default=[], type=_held_out_split, metavar="TASK:SPLIT",
        help="leave out the images of these evaluation splits (vqa:val2014 gqa:testdev retrieval:test)",
    )
    corpus.add_argument("--answers", type=Path, help="the QA answer table (default: answers.json beside OUT)")
    data.set_defaults(func=_data)

    predict = commands.add_parser(
        "predict", help="predict a split with a saved fine-tuned model (a finetune job's model/), without training"
    )
    predict.add_argument("task", choices=list(TASKS))
    predict.add_argument("--model", required=True, type=Path, help="the saved model directory")
    predict.add_argument("--data-root", required=True, type=Path, help="the official files, named as data.root has them")
    predict.add_argument("--split", required=True, help="e.g. test2015 (VQA), testdev (GQA), test1 (NLVR2), test")
    predict.add_argument("--features", required=True, type=Path, help="the task's image set's HDF5 region features")
    predict.add_argument("--out", required=True, type=Path, help="folder for the predictions file")
    predict.add_argument("--evaluate", action="store_true", help="also score the predictions (needs the split's labels)")
    predict.set_defaults(func=_predict)

    config = commands.add_parser("config", help="workflow configuration")
    config_actions = config.add_subparsers(dest="action", required=True)
    validate = config_actions.add_parser("validate", help="check a config file against the schema")
    validate.add_argument("config", type=Path)
    config.set_defaults(func=_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    from semvlp.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (InputError, ConfigError) as err:
        print(f"semvlp: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
