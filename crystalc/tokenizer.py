"""Tokenizers that travel with a model: characters, or a Hugging Face tokenizers JSON.

Ids are always those of the original tokenizer; vocabulary pruning maps them to
rows of the pruned model elsewhere (Graph.to_current_ids).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from crystalc.errors import CrystalError


def check_spec(spec: Any, n_ids: int | None = None) -> None:
    """Check a tokenizer record's structure (and, for characters, its size against `n_ids`).

    Cheap enough for Graph.verify: a Hugging Face JSON is parsed when a model is loaded (the front end)
    and when it is used, not here.
    """
    if not isinstance(spec, dict):
        raise CrystalError(f"tokenizer: expected a record with a 'kind', got type {type(spec).__name__}")
    kind = spec.get("kind")
    if kind == "char":
        if set(spec) - {"kind", "chars"}:  # its file sections hold the characters alone (docs/crystal-format.md)
            extra = ", ".join(sorted(map(repr, set(spec) - {"kind", "chars"})))
            raise CrystalError(f"tokenizer: a char tokenizer has a 'kind' and 'chars' only, not {extra}")
        chars = spec.get("chars")
        if not isinstance(chars, str) or not chars:
            raise CrystalError("tokenizer: a char tokenizer needs a non-empty 'chars' string")
        if len(set(chars)) != len(chars):
            raise CrystalError("tokenizer: 'chars' repeats a character")
        try:
            chars.encode("utf-8")
        except UnicodeEncodeError:
            raise CrystalError("tokenizer: 'chars' holds a character UTF-8 cannot encode") from None
        if n_ids is not None and len(chars) != n_ids:
            raise CrystalError(f"tokenizer: {len(chars)} characters for a vocabulary of {n_ids} ids")
    elif kind == "hf-tokenizers":
        if not isinstance(spec.get("json"), str):
            raise CrystalError("tokenizer: a Hugging Face tokenizer needs its 'json' as a string")
    else:
        raise CrystalError(f"tokenizer: unknown kind {kind!r} (expected 'char' or 'hf-tokenizers')")


def _not_utf8(text: str, at: int) -> CrystalError:
    """text[at] is a lone surrogate: a command line's byte that is not UTF-8 arrives as U+DC80..U+DCFF
    (surrogateescape), named here as the byte it was."""
    code = ord(text[at])
    what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
    return CrystalError(f"the text is not valid UTF-8 ({what} at character {at})")


class Tokenizer:
    def __init__(self, spec: dict[str, Any], n_ids: int | None = None) -> None:
        """`n_ids`: the model's original vocabulary, which the tokenizer's must equal (checked by check_spec for
        characters, here for a Hugging Face tokenizer, whose size is known once its JSON is parsed)."""
        check_spec(spec, n_ids)
        self.spec = spec
        kind = spec["kind"]
        if kind == "char":
            self.chars = spec["chars"]
            self.index = {ch: i for i, ch in enumerate(self.chars)}
            self.vocab_size = len(self.chars)
            self._hf = None
        else:
            try:
                from tokenizers import Tokenizer as HFTokenizer
            except ImportError:
                raise CrystalError("tokenizer: this model needs the 'tokenizers' package "
                                   "(pip install tokenizers)") from None
            try:
                self._hf = HFTokenizer.from_str(spec["json"])
            except Exception as e:
                raise CrystalError(f"tokenizer: bad tokenizer.json: {e}") from None
            # A prompt or a corpus is one sequence: padding would add tokens to it (Fixed: 2^40 aborted inside
            # the library) and truncation cut it, both silently; they are for batches of a fixed length
            self._hf.no_padding()
            self._hf.no_truncation()
            self.vocab_size = self._hf.get_vocab_size()
            if n_ids is not None and self.vocab_size != n_ids:
                raise CrystalError(f"tokenizer: {self.vocab_size} tokens for a vocabulary of {n_ids} ids")
        self.kind: str = kind

    def encode(self, text: str, strict: bool = True) -> list[int]:
        """Ids of `text`; with strict=False, characters the tokenizer lacks are skipped."""
        return self.encode_counted(text, strict)[0]

    def encode_counted(self, text: str, strict: bool = False, limit: int | None = None) -> tuple[list[int], int]:
        """Ids of `text`, at most `limit` of them, and how many characters the tokenizer lacked on the way
        (skipped; with strict=True, an error). A byte-level BPE lacks none."""
        if self._hf is not None:
            try:  # a command line's invalid UTF-8 arrives as lone surrogates, which tokenizers refuses
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise _not_utf8(text, e.start) from None
            try:
                return list(self._hf.encode(text).ids)[:limit], 0
            except Exception as e:  # the library's own (a WordLevel whose unk_token is not in its vocabulary)
                raise CrystalError(f"tokenizer: cannot encode the text ({e})") from None
        out: list[int] = []
        skipped = 0
        for ch in text:
            if limit is not None and len(out) >= limit:
                break
            i = self.index.get(ch)
            if i is None:
                if strict and "\udc80" <= ch <= "\udcff":  # a command line's invalid UTF-8 byte (surrogateescape)
                    raise _not_utf8(text, len(out) + skipped)
                if strict:
                    raise CrystalError(f"character {ch!r} is not in the model's vocabulary")
                skipped += 1
                continue
            out.append(i)
        return out, skipped

    def decode(self, ids: list[int]) -> str:
        if self._hf is not None:
            try:
                return self._hf.decode(ids)
            except Exception as e:
                raise CrystalError(f"tokenizer: cannot decode ids ({e})") from None
        return "".join(self.chars[i] for i in ids)


def char_tokenizer(text: str) -> dict[str, Any]:
    """The spec's char tokenizer over the sorted characters of `text`."""
    return {"kind": "char", "chars": "".join(sorted(set(text)))}


@dataclass(frozen=True)
class ByteLevelBPE:
    """A Hugging Face byte-level BPE as tables a C program runs (templates/c/crystal_cli.c, encode_bpe):
    GPT-2's pre-tokenizer splits the text, each piece starts as one id per byte, and the adjacent pair of
    lowest merge rank is merged until none is left (the leftmost among equals)."""

    token_bytes: tuple[bytes, ...]  # per id: the bytes it stands for (its text, byte-level decoded)
    byte_ids: tuple[int, ...]  # 256: the id of each single byte
    merges: tuple[tuple[int, int, int], ...]  # in rank order: (left id, right id, merged id)

    def merge_table(self) -> np.ndarray:
        """[M, 4] int32 rows (left id, right id, rank, merged id) sorted by pair, as the C programs binary-search
        them (the C backend's model.c and a .crystal file's tokenizer.bpe.merges alike)."""
        rows = sorted((a, b, rank, m) for rank, (a, b, m) in enumerate(self.merges))
        return np.asarray(rows, dtype="<i4").reshape(-1, 4)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest for code points from 256."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


def byte_level_bpe(json_text: str) -> ByteLevelBPE:
    """The tables of a tokenizer.json that is a plain byte-level BPE (what `crystalc train --tokenizer bpe:N`
    writes: no normalizer, no added tokens, GPT-2's pre-tokenizer without a prefix space, no post-processing;
    truncation and padding, which Tokenizer turns off, are let be); a CrystalError naming what else it holds."""
    try:
        spec = json.loads(json_text)
    except (ValueError, RecursionError) as e:
        raise CrystalError(f"tokenizer.json is not JSON within Python's nesting limit ({e})") from None
    try:
        return _byte_level_bpe(spec)
    except (TypeError, AttributeError, KeyError, IndexError) as e:  # a field of another type than the library's
        raise CrystalError(f"the tokenizer.json is not one the library writes ({type(e).__name__}: {e})") from None


def _byte_level_bpe(spec: Any) -> ByteLevelBPE:
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise CrystalError("the tokenizer is not a BPE")
    plain = {"dropout": None, "unk_token": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
             "fuse_unk": False, "byte_fallback": False, "ignore_merges": False}
    for key, want in plain.items():
        if model.get(key, want) != want:
            raise CrystalError(f"the BPE has {key} = {model[key]!r}")
    if spec.get("normalizer") is not None or spec.get("added_tokens"):
        raise CrystalError("the tokenizer has a normalizer or added tokens")
    # the library's encode applies a post-processor's special tokens around the text
    post = spec.get("post_processor")
    if post is not None and post.get("type") != "ByteLevel":  # (ByteLevel trims offsets only)
        raise CrystalError(f"the tokenizer has a {post.get('type')} post-processor")
    pre = spec.get("pre_tokenizer")
    if not (isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("add_prefix_space") is False
            and pre.get("use_regex", True) is True):
        raise CrystalError("the pre-tokenizer is not byte-level, GPT-2's pattern, without a prefix space")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise CrystalError("the decoder is not byte-level")
    vocab = model.get("vocab")
    if (not isinstance(vocab, dict) or any(type(i) is not int for i in vocab.values())
            or sorted(vocab.values()) != list(range(len(vocab)))):
        raise CrystalError("the BPE's vocabulary ids are not 0..V-1, once each")
    alphabet = _byte_level_alphabet()
    token_bytes: list[bytes] = [b""] * len(vocab)
    for text, i in vocab.items():
        if not isinstance(text, str) or not text or any(ch not in alphabet for ch in text):
            raise CrystalError(f"the BPE's token {text!r} is not byte-level text")
        token_bytes[i] = bytes(alphabet[ch] for ch in text)
    byte_ids = [vocab.get(ch) for ch in sorted(alphabet, key=alphabet.__getitem__)]
    if any(i is None for i in byte_ids):
        raise CrystalError("the BPE lacks a byte of the byte-level alphabet")
    merges = []
    for pair in model.get("merges") or []:
        parts = pair.split(" ") if isinstance(pair, str) else pair
        if not (isinstance(parts, list) and len(parts) == 2 and all(isinstance(p, str) and p in vocab for p in parts)
                and parts[0] + parts[1] in vocab):
            raise CrystalError(f"the BPE's merge {pair!r} is not two tokens whose sum is one")
        merges.append((vocab[parts[0]], vocab[parts[1]], vocab[parts[0] + parts[1]]))
    if len({(a, b) for a, b, _ in merges}) != len(merges):
        raise CrystalError("the BPE merges a pair twice")
    return ByteLevelBPE(tuple(token_bytes), tuple(int(i) for i in byte_ids if i is not None), tuple(merges))
