"""Benchmark: peak memory of two paper-size preparations, each in a fresh process.

Writes once, into --cache-dir:
* VQA v2 train in the official format at its real size: 443,757 questions over 82,783 images, 10
  annotator answers each, answers distributed so that exactly 3,129 occur at least 9 times as the
  most common answer (the VQA v2 convention's answer table);
* a pre-training corpus (our jsonl) at LXMERT's size, 9.18M sentences over COCO and Visual Genome
  sized image sets, captions and questions of typical length (about 11 words).

Then measures the peak resident memory (ru_maxrss) of
* `vqa_peak_rss_mb`: preparing the VQA training examples (`semvlp.tasks.vqa.VQA.training_examples`: load
  and check both files, the answer table, sparse soft targets per question);
* `corpus_peak_rss_mb`: loading the corpus for a phase as `PretrainBatches` holds it
  (`semvlp.data.corpus.read_corpus`, the distinct images it samples mismatches from, and every
  sentence tokenised once, `semvlp.batching.TokenizedText`, with a WordPiece vocabulary trained on a
  sample of the sentences).
Both processes first import `semvlp.pretrain` (torch included), as the jobs do; the figures include it.

    python benchmarks/paper_scale_memory.py --cache-dir /tmp/semvlp-memory

The last line is one JSON object with these figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from semvlp.tokenization import train_wordpiece

QUESTIONS, IMAGES, KEPT, MIN_COUNT = 443_757, 82_783, 3_129, 9
SENTENCES, CORPUS_IMAGES = 9_180_000, 180_000
WORDS = ("what is the man woman dog cat holding on left right of a table red blue white black color "
         "how many people are there in picture standing next to street sitting large small wooden building "
         "sky tree car bus train water field grass plate food pizza kite wearing shirt hat").split()


def write_vqa(folder: Path, count: int) -> tuple[Path, Path, int]:
    """VQA v2 train files of `count` questions; returns their paths and how many answers the table keeps."""
    kept_count = min(KEPT, count // (2 * MIN_COUNT))  # 3,129 at the real size
    folder = folder / f"vqa{count}"
    folder.mkdir(exist_ok=True)
    questions_path = folder / "v2_OpenEnded_mscoco_train2014_questions.json"
    annotations_path = folder / "v2_mscoco_train2014_annotations.json"
    if questions_path.is_file() and annotations_path.is_file():
        return questions_path, annotations_path, kept_count
    rng = np.random.default_rng(0)
    # most common answers: every kept answer 9 times, then a Zipf draw over the kept ones; 10 % rare
    # answers seen at most 8 times (so they stay out of the table)
    kept = [f"answer{i}" for i in range(kept_count)]
    head = np.repeat(np.arange(kept_count), MIN_COUNT)
    tail = np.minimum(rng.zipf(1.3, count - len(head)) - 1, kept_count - 1)
    rare = rng.random(len(tail)) < 0.1
    top = [kept[i] for i in head] + [f"rare{n // 8}" if r else kept[i] for n, (i, r) in enumerate(zip(tail, rare))]
    images = rng.integers(0, 10 * IMAGES, IMAGES)[rng.integers(0, IMAGES, count)]
    questions, annotations = [], []
    for qid, (answer, image) in enumerate(zip(top, images.tolist())):
        words = rng.choice(WORDS, int(rng.integers(4, 10))).tolist()
        questions.append({"image_id": image, "question": " ".join(words) + "?", "question_id": qid})
        others = [kept[i] for i in rng.integers(0, kept_count, 4)]
        given = [answer] * 6 + others
        annotations.append({
            "question_id": qid, "image_id": image, "question_type": "what is", "answer_type": "other",
            "multiple_choice_answer": answer,
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(given)],
        })
    common = {"info": {}, "license": {}, "data_type": "mscoco", "data_subtype": "train2014"}
    questions_path.write_text(json.dumps({**common, "task_type": "Open-Ended", "questions": questions}))
    annotations_path.write_text(json.dumps({**common, "annotations": annotations}))
    return questions_path, annotations_path, kept_count


def write_corpus(folder: Path, count: int) -> Path:
    path = folder / f"pretrain{count}.jsonl"
    if path.is_file():
        return path
    rng = np.random.default_rng(1)
    # a pool of distinct sentences, dealt out at random: generating 9.18M from scratch is what takes time
    pool = [" ".join(rng.choice(WORDS, int(rng.integers(7, 16))).tolist()) for _ in range(200_000)]
    answers = [f"answer{i}" for i in range(KEPT)]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for start in range(0, count, 200_000):
            n = min(200_000, count - start)
            picks, images, kinds = rng.integers(0, len(pool), n), rng.integers(0, CORPUS_IMAGES, n), rng.integers(0, 3, n)
            lines = []
            for pick, image, kind in zip(picks.tolist(), images.tolist(), kinds.tolist()):
                if kind == 0:
                    lines.append(f'{{"img_set": "coco", "img_id": "COCO_train2014_{image:012d}", "sentence": "{pool[pick]}", "answer": null, "source": "coco_captions"}}\n')
                elif kind == 1:
                    lines.append(f'{{"img_set": "coco", "img_id": "COCO_train2014_{image:012d}", "sentence": "{pool[pick]}?", "answer": "{answers[pick % KEPT]}", "source": "vqa"}}\n')
                else:
                    lines.append(f'{{"img_set": "gqa", "img_id": "{image + 2_000_000}", "sentence": "{pool[pick]}?", "answer": "{answers[pick % 1800]}", "source": "gqa"}}\n')
            out.write("".join(lines))
    tmp.rename(path)
    return path


VQA_JOB = """
import json, resource, sys, time
import semvlp.pretrain
from semvlp.config import SCHEMA_PATH, load_config
from semvlp.tasks import TASKS
spec = TASKS["vqa"]
section = {{**load_config(SCHEMA_PATH.parents[2] / "config" / "config.yaml")["finetune"]["tasks"]["vqa"],
           "train_splits": ["train2014"], "min_answer_count": {min_count}}}
settings = spec.settings.from_config(section, seed=0, max_text_length=20)
task = spec.implementation()(settings, {{"train2014_questions": sys.argv[1], "train2014_annotations": sys.argv[2]}}, None, None)
tic = time.perf_counter()
examples, recorded = task.training_examples()
print(json.dumps({{"answers": len(recorded["answers"]), "examples": len(examples), "seconds": time.perf_counter() - tic,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

CORPUS_JOB = """
import json, resource, sys, time
import semvlp.pretrain
from semvlp.batching import TokenizedText
from semvlp.data.corpus import read_corpus
from semvlp.tokenization import load_tokenizer
tic = time.perf_counter()
corpus = read_corpus(sys.argv[1])
images = sorted(corpus.images())
text = TokenizedText(load_tokenizer(sys.argv[2]), corpus.sentences(), 20)
print(json.dumps({"sentences": len(text), "images": len(images), "seconds": time.perf_counter() - tic,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(script: str, *args: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/semvlp-memory"))
    parser.add_argument("--questions", type=int, default=QUESTIONS, help="VQA questions (the real size unless testing)")
    parser.add_argument("--sentences", type=int, default=SENTENCES, help="corpus sentences (the real size unless testing)")
    args = parser.parse_args(argv)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    questions_path, annotations_path, kept = write_vqa(args.cache_dir, args.questions)
    corpus_path = write_corpus(args.cache_dir, args.sentences)
    print(f"files ready in {time.perf_counter() - tic:.0f} s under {args.cache_dir}")
    vqa = measure(VQA_JOB.format(min_count=MIN_COUNT), questions_path, annotations_path)
    if vqa["answers"] != kept:
        raise SystemExit(f"the answer table kept {vqa['answers']} answers, the files were written for {kept}")
    vocab = args.cache_dir / "tokenizer"
    if not (vocab / "vocab.txt").is_file():
        with open(corpus_path, encoding="utf-8") as lines:
            train_wordpiece((json.loads(line)["sentence"] for line in itertools.islice(lines, 20_000)), 1000, vocab)
    corpus = measure(CORPUS_JOB, corpus_path, vocab)
    print(f"VQA v2 train, {vqa['examples']:,} examples, {vqa['answers']:,} answers: peak {vqa['peak_rss_mb']:,.0f} MB ({vqa['seconds']:.0f} s)")
    print(f"corpus, {corpus['sentences']:,} sentences over {corpus['images']:,} images: peak {corpus['peak_rss_mb']:,.0f} MB ({corpus['seconds']:.0f} s)")
    print(f"  cpu: {os.cpu_count()} cores; reproduce: python benchmarks/paper_scale_memory.py {shlex.join(sys.argv[1:] if argv is None else argv)}")
    print(json.dumps({"vqa_peak_rss_mb": round(vqa["peak_rss_mb"]), "corpus_peak_rss_mb": round(corpus["peak_rss_mb"]),
                      "vqa_examples": vqa["examples"], "vqa_answers": vqa["answers"], "corpus_sentences": corpus["sentences"]}))


if __name__ == "__main__":
    main()
