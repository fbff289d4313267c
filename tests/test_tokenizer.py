"""Tokenizers that travel with a model: characters and byte-level BPE, encode and decode."""

from __future__ import annotations

import pytest

from crystalc.errors import CrystalError
from crystalc.tokenizer import Tokenizer, char_tokenizer
from crystalc.train.data import build_tokenizer

TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"


def test_char_round_trip() -> None:
    tok = Tokenizer(char_tokenizer(TEXT))
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT) and tok.vocab_size == len(set(TEXT))
    assert tok.chars[ids[0]] == "R" and tok.decode(ids) == TEXT
    assert tok.decode([]) == ""


def test_char_encode_of_an_unknown_character() -> None:
    tok = Tokenizer(char_tokenizer(TEXT))
    with pytest.raises(CrystalError):
        tok.encode("ROMEO!")
    assert tok.decode(tok.encode("ROMEO!", strict=False)) == "ROMEO"


def test_bpe_refuses_text_that_was_not_utf8() -> None:
    # a command line's invalid UTF-8 arrives as lone surrogates: one line, not the tokenizers' TypeError
    tok = Tokenizer(build_tokenizer(TEXT * 20, "bpe:300"))
    with pytest.raises(CrystalError, match="not valid UTF-8"):
        tok.encode("ROMEO\udcff")


def test_bpe_round_trip() -> None:
    tok = Tokenizer(build_tokenizer(TEXT * 20, "bpe:300"))
    ids = tok.encode(TEXT)
    assert tok.kind == "hf-tokenizers" and len(ids) < len(TEXT)  # merges: fewer tokens than characters
    assert tok.decode(ids) == TEXT
    assert tok.decode(tok.encode("unseen: é ✓")) == "unseen: é ✓"  # byte level: any text encodes


@pytest.mark.parametrize(("spec", "needle"), [
    ({"kind": "char", "chars": "abca"}, "repeats"),
    ({"kind": "char", "chars": ""}, "non-empty"),
    ({"kind": "hf-tokenizers", "json": "{not json"}, "bad tokenizer.json"),
    ({"kind": "words"}, "unknown kind"),
    ("char", "expected a record"),
])
def test_bad_specs(spec: object, needle: str) -> None:
    with pytest.raises(CrystalError, match=needle):
        Tokenizer(spec)  # type: ignore[arg-type]
