"""Tokenizers that travel with a model: characters, or a Hugging Face tokenizers JSON.

Ids are always those of the original tokenizer; vocabulary pruning maps them to
rows of the pruned model elsewhere (Graph.to_current_ids).
"""

from __future__ import annotations

from typing import Any

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
                raise CrystalError(f"the text is not valid UTF-8 (character {e.start})") from None
            return list(self._hf.encode(text).ids)[:limit], 0
        out: list[int] = []
        skipped = 0
        for ch in text:
            if limit is not None and len(out) >= limit:
                break
            i = self.index.get(ch)
            if i is None:
                if strict:
                    raise CrystalError(f"character {ch!r} is not in the model's vocabulary")
                skipped += 1
                continue
            out.append(i)
        return out, skipped

    def decode(self, ids: list[int]) -> str:
        if self._hf is not None:
            return self._hf.decode(ids)
        return "".join(self.chars[i] for i in ids)


def char_tokenizer(text: str) -> dict[str, Any]:
    """The spec's char tokenizer over the sorted characters of `text`."""
    return {"kind": "char", "chars": "".join(sorted(set(text)))}
