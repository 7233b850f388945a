"""Word-level tokenizer: training, save/load round trip, encode_batch padding and validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xmr.models.errors import InputError
from xmr.models.tokenizer import (
    PAD_ID,
    UNK_ID,
    TextLimits,
    decode,
    encode_batch,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

CAPTIONS = [
    "a large red circle to the left of a small blue square",
    "there is a small blue square right of a big red circle",
    "a tiny green triangle in the top left corner",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CAPTIONS)


def test_special_ids(tok) -> None:
    assert tok.token_to_id("[PAD]") == PAD_ID == 0
    assert tok.token_to_id("[UNK]") == UNK_ID == 1
    assert tok.get_vocab_size() == 2 + len({w for c in CAPTIONS for w in c.split()})


def test_min_freq_drops_rare_words() -> None:
    tok = train_tokenizer(CAPTIONS, min_freq=2)
    assert tok.token_to_id("red") is not None and tok.token_to_id("green") is None
    with pytest.raises(InputError, match="no word occurs at least min_freq=9"):
        train_tokenizer(CAPTIONS, min_freq=9)


def test_save_load_round_trip(tok, tmp_path: Path) -> None:
    texts = CAPTIONS + ["a zebra, not a circle"]
    path = save_tokenizer(tok, tmp_path / "tok")  # a folder -> tok/tokenizer.json
    assert path == tmp_path / "tok" / "tokenizer.json"
    loaded = load_tokenizer(tmp_path / "tok")
    for a, b in zip(encode_batch(tok, texts), encode_batch(loaded, texts), strict=True):
        np.testing.assert_array_equal(a, b)
    assert load_tokenizer(path).get_vocab() == tok.get_vocab()


def test_lowercase_and_accents(tok) -> None:
    ids, _ = encode_batch(tok, ["A LARGE Red CIRCLE", "a large red circle", "a lárge réd circle"])
    assert (ids[0] == ids[1]).all() and (ids[1] == ids[2]).all()


def test_unknown_words_map_to_unk(tok) -> None:
    ids, lengths = encode_batch(tok, ["a purple zebra circle"])
    assert ids.tolist() == [[tok.token_to_id("a"), UNK_ID, UNK_ID, tok.token_to_id("circle")]]
    assert decode(tok, ids[0]) == "a [UNK] [UNK] circle"


def test_padding_and_lengths(tok) -> None:
    ids, lengths = encode_batch(tok, ["red circle", "a small blue square", "red"])
    assert ids.dtype == lengths.dtype == np.int64
    assert ids.shape == (3, 4) and lengths.tolist() == [2, 4, 1]
    assert (ids[0, 2:] == PAD_ID).all() and (ids[2, 1:] == PAD_ID).all()
    assert (ids[1] != PAD_ID).all()
    assert decode(tok, ids[0]) == "red circle"


def test_truncation(tok) -> None:
    ids, lengths = encode_batch(tok, ["red " * 50, "blue"], TextLimits(max_tokens=8))
    assert ids.shape == (2, 8) and lengths.tolist() == [8, 1]


def test_error_empty_batch_and_single_string(tok) -> None:
    with pytest.raises(InputError, match="texts is empty; expected at least one text"):
        encode_batch(tok, [])
    with pytest.raises(InputError, match="texts is a single str"):
        encode_batch(tok, "red circle")


def test_error_non_str(tok) -> None:
    with pytest.raises(InputError, match="text 1 is a int; expected a str"):
        encode_batch(tok, ["red", 3])  # type: ignore[list-item]


def test_error_empty_text(tok) -> None:
    with pytest.raises(InputError, match="text 0 is empty; expected at least one word"):
        encode_batch(tok, ["  \t ", "red"])


def test_error_too_many_bytes(tok) -> None:
    with pytest.raises(InputError, match="text 0 is 102400 bytes; the limit is 4096"):
        encode_batch(tok, ["a" * 102400])
    with pytest.raises(InputError, match="text 1 is 12 bytes; the limit is 10"):
        encode_batch(tok, ["red", "é" * 6], TextLimits(max_bytes=10))  # bytes, not characters


def test_error_no_known_words(tok) -> None:
    with pytest.raises(InputError, match=r"text 1 has no known words: 'zebra giraffe .*\.\.\.'"):
        encode_batch(tok, ["red", "zebra giraffe " * 10])


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="tokenizer file .*missing.json does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="is not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
