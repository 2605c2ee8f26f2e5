"""WordPiece vocabulary training (for models trained from scratch) and tokenizer loading.

A tokenizer directory is anything with BERT's `vocab.txt`: the output of `train_wordpiece`, or a
BERT-family checkpoint directory (whose `tokenizer_config.json`, when present, says e.g. whether
to lowercase).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import BertTokenizerFast

from semvlp.errors import InputError
from semvlp.io import atomic_path

# In this order, so [PAD] is id 0 (the model's pad_token_id) and the rest follow.
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB_FILE = "vocab.txt"


def train_wordpiece(sentences: Iterable[str], vocab_size: int, out_dir: str | Path) -> Path:
    """Train a lowercase BERT-style WordPiece vocabulary on `sentences`; returns the written `vocab.txt`.

    Normalisation and pre-tokenisation are BERT's (clean text, lowercase, strip accents, split on
    whitespace and punctuation), so `load_tokenizer` reproduces them. `vocab_size` counts the
    special tokens and the character alphabet; a small corpus may give fewer entries. The same
    sentences give the same file in every process (see `_alphabet`).
    """
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
    sentences = list(sentences)
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *_alphabet(tokenizer, sentences)],
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tokenizer.train_from_iterator(sentences, trainer=trainer)
    vocab = tokenizer.get_vocab()  # token -> id, ids 0..n-1
    if len(vocab) == len(SPECIAL_TOKENS):
        raise ValueError("no text to train a WordPiece vocabulary on")
    tokens = sorted(vocab, key=vocab.__getitem__)
    vocab_path = Path(out_dir) / VOCAB_FILE
    with atomic_path(vocab_path) as tmp:
        tmp.write_text("".join(token + "\n" for token in tokens), encoding="utf-8")
    return vocab_path


def _alphabet(tokenizer: Tokenizer, sentences: list[str]) -> list[str]:
    """The corpus' characters in sorted order: word-initial ones bare, the others with the `##` prefix.

    The trainer gives the `##` characters ids in the iteration order of a hash map that is seeded
    anew in every process, and breaks ties between equally frequent merges by those ids, so the
    learnt vocabulary differed from run to run. Handing it the alphabet up front (as tokens it keeps
    first) fixes the ids and with them every tie-break.
    """
    initial, continuing = set(), set()
    for sentence in sentences:
        for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(sentence)):
            initial.add(word[0])
            continuing.update(word[1:])
    return sorted(initial) + ["##" + char for char in sorted(continuing)]


def load_tokenizer(tokenizer_dir: str | Path) -> BertTokenizerFast:
    """BERT tokenizer of a directory holding `vocab.txt` (ours or a BERT checkpoint's); loads nothing remote."""
    tokenizer_dir = Path(tokenizer_dir)
    vocab_path = tokenizer_dir / VOCAB_FILE
    if not vocab_path.is_file():
        raise InputError(f"no {VOCAB_FILE} in the tokenizer directory", tokenizer_dir)
    tokenizer = BertTokenizerFast.from_pretrained(str(tokenizer_dir), local_files_only=True)
    missing = [token for token in SPECIAL_TOKENS if token not in tokenizer.get_vocab()]
    if missing:
        raise InputError(f"vocabulary lacks the special token(s) {missing}", vocab_path)
    return tokenizer


def save_tokenizer(tokenizer: BertTokenizerFast, out_dir: str | Path) -> None:
    """The tokenizer's files into `out_dir`, `vocab.txt` among them, so `load_tokenizer(out_dir)` loads it
    (transformers 5 writes only tokenizer.json for a fast tokenizer)."""
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(str(out_dir))
    tokens = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    with atomic_path(out_dir / VOCAB_FILE) as tmp:
        tmp.write_text("".join(token + "\n" for token, _ in tokens), encoding="utf-8")
