"""Caption tokenizers, one ``tokenizer.json`` shared by training and serving.

Word level rather than BPE/WordPiece because the vocabularies we train on are small and closed
(Shapes has ~60 words, the VSE-family captions ~10K after a frequency cut), which is what the GRU
text encoders of VSE++/SCAN were built for. The tokenizer is a Hugging Face ``tokenizers`` object
so the exact same file - normalisation (NFD, lower-case, strip accents), splitting and vocabulary -
is loaded by the training loop and by the Triton tokenizer model, and ``encode_batch`` below is
the single function both call, so the ids can never drift apart.

A pretrained text tower brings its own tokenizer instead (all-MiniLM-L6-v2: WordPiece, ``[PAD]`` = 0,
``[UNK]`` = 100, ``[CLS] ... [SEP]`` added by the file's post-processor). ``encode_batch`` handles both:
a tokenizer without a post-processor gets its words truncated to ``max_tokens``; one with a
post-processor gets its word pieces truncated to ``max_tokens`` minus the special tokens the
post-processor adds, and then the post-processor, so a truncated caption still ends in ``[SEP]``.
``encode_batch`` alone truncates and pads: a tokenizer that would do either itself is refused, and
``load_tokenizer`` switches both off (MiniLM's own file pads to 128).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from xmr.models.errors import InputError

PAD, UNK = "[PAD]", "[UNK]"
PAD_ID, UNK_ID = 0, 1  # train_tokenizer's ids; a pretrained tokenizer keeps [PAD]=0, its [UNK] may differ


@dataclass
class TextLimits:
    max_tokens: int = 32  # truncate beyond: Shapes captions are <= 30 words, COCO's 99th percentile ~25
    max_bytes: int = 4096  # reject longer raw text before tokenising, so one request can't stall a batch


def _blank_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()]
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and runs of punctuation
    return tok


def train_tokenizer(captions: Iterable[str], min_freq: int = 1) -> Tokenizer:
    """A word-level vocabulary of the words seen at least ``min_freq`` times; ``[PAD]`` = 0, ``[UNK]`` = 1."""
    tok = _blank_tokenizer()
    trainer = trainers.WordLevelTrainer(
        min_frequency=min_freq, special_tokens=[PAD, UNK], show_progress=False
    )
    tok.train_from_iterator(captions, trainer)
    if tok.get_vocab_size() <= 2:
        raise InputError(
            f"no word occurs at least min_freq={min_freq} times in the captions; expected a vocabulary"
        )
    return tok


def _resolve(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".json" else path / "tokenizer.json"


def save_tokenizer(tok: Tokenizer, path: str | Path) -> Path:
    """Write ``tok`` to ``path`` (a ``.json`` file, or a folder to hold ``tokenizer.json``); returns it."""
    path = _resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a ``tokenizer.json`` written by ``save_tokenizer`` (``path`` may be its folder).

    Any padding or truncation stored in the file is switched off: ``encode_batch`` does both."""
    path = _resolve(path)
    if not path.is_file():
        raise InputError(
            f"tokenizer file {path} does not exist; expected a tokenizer.json from save_tokenizer"
        )
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception on bad JSON
        raise InputError(f"tokenizer file {path} is not a valid tokenizer.json ({e})") from e
    if tok.token_to_id(PAD) != PAD_ID or tok.token_to_id(UNK) is None:
        raise InputError(
            f"tokenizer file {path} does not have {PAD}=0 and an {UNK} token; expected one from "
            "train_tokenizer (or a pretrained text tower's, e.g. minilm_tokenizer)"
        )
    tok.no_padding()
    tok.no_truncation()
    return tok


def _shorten(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def _check_text(i: int, text: object, limits: TextLimits) -> None:
    if not isinstance(text, str):
        raise InputError(f"text {i} is a {type(text).__name__}; expected a str")
    n_bytes = len(text.encode("utf-8"))
    if n_bytes > limits.max_bytes:
        raise InputError(f"text {i} is {n_bytes} bytes; the limit is {limits.max_bytes}")
    if not text.strip():
        raise InputError(f"text {i} is empty; expected at least one word")


def encode_batch(
    tok: Tokenizer, texts: Sequence[str], limits: TextLimits = TextLimits()
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (B, L) int64, right-padded with 0 to the longest text (after truncation to
    ``limits.max_tokens``, special tokens included), and lengths (B,) int64. Raises InputError naming
    the first bad text."""
    if isinstance(texts, (str, bytes)):
        raise InputError(f"texts is a single {type(texts).__name__}; expected a sequence of strings")
    if len(texts) == 0:
        raise InputError("texts is empty; expected at least one text")
    for i, text in enumerate(texts):
        _check_text(i, text, limits)
    if tok.padding is not None or tok.truncation is not None:
        raise InputError(
            "the tokenizer pads or truncates by itself; expected neither (encode_batch does both): "
            "load it with load_tokenizer, or call no_padding() and no_truncation()"
        )
    post = tok.post_processor  # None for train_tokenizer's word-level tokenizers
    n_special = 0 if post is None else post.num_special_tokens_to_add(False)
    if limits.max_tokens <= n_special:
        raise InputError(
            f"max_tokens={limits.max_tokens} leaves no room for words; expected more than the "
            f"{n_special} special tokens the tokenizer adds"
        )
    unk_id = tok.token_to_id(UNK)
    encodings = tok.encode_batch(list(texts), add_special_tokens=False)
    words = [e.ids[: limits.max_tokens - n_special] for e in encodings]
    for i, row in enumerate(words):
        if all(t == unk_id for t in row):  # also catches punctuation-free texts that tokenise to nothing
            raise InputError(f"text {i} has no known words: {_shorten(texts[i])}")
    if post is None:
        ids = words
    else:  # truncate the word pieces, then let the post-processor add [CLS] ... [SEP]
        for e in encodings:
            e.truncate(limits.max_tokens - n_special)
        ids = [post.process(e).ids for e in encodings]
    lengths = np.array([len(row) for row in ids], dtype=np.int64)  # (B,)
    input_ids = np.full((len(ids), int(lengths.max())), PAD_ID, dtype=np.int64)  # (B, L)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = row
    return input_ids, lengths


def decode(tok: Tokenizer, ids: Sequence[int] | np.ndarray) -> str:
    """The words of ``ids`` joined by spaces, padding dropped, unknown words shown as ``[UNK]``."""
    return tok.decode([int(t) for t in ids if int(t) != PAD_ID], skip_special_tokens=False)
