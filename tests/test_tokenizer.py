"""Tokenizers that travel with a model: characters and byte-level BPE, encode and decode."""

from __future__ import annotations

import json

import pytest

from crystalc.errors import CrystalError
from crystalc.tokenizer import Tokenizer, byte_level_bpe, char_tokenizer
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
    ({"kind": "char"}, "non-empty"),
    ({"kind": "hf-tokenizers", "json": "{not json"}, "bad tokenizer.json"),
    ({"kind": "words"}, "unknown kind"),
    ("char", "expected a record"),
    # .crystal keeps a char tokenizer's characters alone: another key would be written where it is refused
    ({"kind": "char", "chars": "ab", "extra": 1}, "'kind' and 'chars' only, not 'extra'"),
])
def test_bad_specs(spec: object, needle: str) -> None:
    with pytest.raises(CrystalError, match=needle):
        Tokenizer(spec)  # type: ignore[arg-type]


def test_a_bpe_tokenizer_must_fit_the_model() -> None:
    """Its size is known once parsed: a model of 280 ids with 300 tokens would read ids 280..299 as pruned,
    and one of 400 would generate ids the tokenizer drops when decoding."""
    spec = build_tokenizer(TEXT * 20, "bpe:300")
    size = Tokenizer(spec).vocab_size  # up to 300: as many merges as the text offers
    assert Tokenizer(spec, size).vocab_size == size
    for n in (size - 20, size + 100):
        with pytest.raises(CrystalError, match=f"{size} tokens for a vocabulary of {n} ids"):
            Tokenizer(spec, n)


def test_byte_level_bpe_tables() -> None:
    """The tables the C programs encode with (crystal_cli.c's encode_bpe; tests/backends/test_c.py runs it against
    the tokenizers library): each id's bytes, each byte's id, the merges in rank order."""
    spec = build_tokenizer(TEXT * 20, "bpe:300")
    tok = Tokenizer(spec)
    bpe = byte_level_bpe(spec["json"])
    assert len(bpe.token_bytes) == tok.vocab_size and len(bpe.byte_ids) == 256
    for i, piece in enumerate(bpe.token_bytes):
        assert tok.decode([i]).encode() == piece or b"\xef\xbf\xbd" in tok.decode([i]).encode()
    assert [bpe.token_bytes[i] for i in bpe.byte_ids] == [bytes([b]) for b in range(256)]
    for a, b, m in bpe.merges:
        assert bpe.token_bytes[a] + bpe.token_bytes[b] == bpe.token_bytes[m]
    ids = tok.encode(TEXT)
    assert b"".join(bpe.token_bytes[i] for i in ids) == TEXT.encode()


@pytest.mark.parametrize(("change", "needle"), [
    (lambda j: j.update(normalizer={"type": "Lowercase"}), "normalizer or added tokens"),
    (lambda j: j["added_tokens"].append({"id": 0, "content": "<s>"}), "normalizer or added tokens"),
    (lambda j: j["pre_tokenizer"].update(add_prefix_space=True), "without a prefix space"),
    (lambda j: j.update(pre_tokenizer={"type": "Whitespace"}), "pre-tokenizer is not byte-level"),
    (lambda j: j.update(decoder=None), "decoder is not byte-level"),
    (lambda j: j["model"].update(dropout=0.1), "dropout = 0.1"),
    (lambda j: j["model"].update(type="WordPiece"), "not a BPE"),
    (lambda j: j["model"]["vocab"].update({"zz": 10_000}), "not 0..V-1"),
    (lambda j: j["model"]["merges"].append(["Ġ", "Ġ"]) if "ĠĠ" not in j["model"]["vocab"]
     else j["model"]["merges"].append(["x", "zzz"]), "merge"),
    (lambda j: j["model"]["merges"].append(j["model"]["merges"][0]), "merges a pair twice"),
    # found by an audit: the library's encode adds a post-processor's tokens, which the tables do not; and
    # fields of other types than the library writes were tracebacks
    (lambda j: j.update(post_processor={"type": "TemplateProcessing", "single": [], "pair": [],
                                        "special_tokens": {}}), "TemplateProcessing post-processor"),
    (lambda j: j["model"]["vocab"].update({"zz": 5.0}), "not 0..V-1"),
    (lambda j: j.update(decoder="ByteLevel"), "not one the library writes"),
    (lambda j: j["model"]["merges"].append([["a"], "b"]), "merge"),
])
def test_byte_level_bpe_refuses_what_it_cannot_lower(change, needle: str) -> None:
    j = json.loads(build_tokenizer(TEXT * 20, "bpe:300")["json"])
    change(j)
    with pytest.raises(CrystalError, match=needle):
        byte_level_bpe(json.dumps(j))


def test_byte_level_bpe_takes_what_does_not_change_the_ids() -> None:
    # GPT-2's own tokenizer.json has a ByteLevel post-processor (offsets only); JSON nested past Python's
    # limit is refused in one line, not a RecursionError
    spec = build_tokenizer(TEXT * 20, "bpe:300")
    j = json.loads(spec["json"])
    j["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    other = {"kind": "hf-tokenizers", "json": json.dumps(j)}
    assert Tokenizer(other).encode(TEXT) == Tokenizer(spec).encode(TEXT)
    assert byte_level_bpe(other["json"]) == byte_level_bpe(spec["json"])
    with pytest.raises(CrystalError, match="nesting limit"):
        byte_level_bpe("[" * 100_000 + "]" * 100_000)


def test_padding_and_truncation_do_not_touch_a_sequence() -> None:
    # a prompt or a corpus is one sequence, not a batch: the library would pad it (to 2^40 tokens it aborted) or
    # cut it, silently; the tables of the C programs encode as Tokenizer does
    spec = build_tokenizer(TEXT * 20, "bpe:300")
    j = json.loads(spec["json"])
    j["truncation"] = {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0}
    j["padding"] = {"strategy": {"Fixed": 1 << 40}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                    "pad_type_id": 0, "pad_token": "!"}
    other = {"kind": "hf-tokenizers", "json": json.dumps(j)}
    assert Tokenizer(other).encode(TEXT) == Tokenizer(spec).encode(TEXT)
    assert byte_level_bpe(other["json"]) == byte_level_bpe(spec["json"])


def test_the_library_s_own_errors_are_one_line() -> None:
    # a WordLevel whose unknown token is not in its vocabulary: the library raises on a word it lacks
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}, "unk_token": "<unk>"}}
    tok = Tokenizer({"kind": "hf-tokenizers", "json": json.dumps(spec)})
    assert tok.encode("a b") == [0, 1]
    with pytest.raises(CrystalError, match="tokenizer: cannot encode the text"):
        tok.encode("a c")
