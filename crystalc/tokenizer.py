"""Tokenizers that travel with a model: characters, or a Hugging Face tokenizers JSON.

Ids are always those of the original tokenizer; vocabulary pruning maps them to
rows of the pruned model elsewhere (Graph.to_current_ids).
"""

from __future__ import annotations

from typing import Any

from crystalc.errors import CrystalError


class Tokenizer:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        kind = spec.get("kind")
        if kind == "char":
            chars = spec.get("chars")
            if not isinstance(chars, str) or not chars:
                raise CrystalError("tokenizer: a char tokenizer needs a non-empty 'chars' string")
            if len(set(chars)) != len(chars):
                raise CrystalError("tokenizer: 'chars' repeats a character")
            self.chars = chars
            self.index = {ch: i for i, ch in enumerate(chars)}
            self.vocab_size = len(chars)
            self._hf = None
        elif kind == "hf-tokenizers":
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
        else:
            raise CrystalError(f"tokenizer: unknown kind {kind!r} (expected 'char' or 'hf-tokenizers')")
        self.kind: str = kind

    def encode(self, text: str, strict: bool = True) -> list[int]:
        """Ids of `text`; with strict=False, characters the tokenizer lacks are skipped."""
        if self._hf is not None:
            return list(self._hf.encode(text).ids)
        out = []
        for ch in text:
            i = self.index.get(ch)
            if i is None:
                if strict:
                    raise CrystalError(f"character {ch!r} is not in the model's vocabulary")
                continue
            out.append(i)
        return out

    def decode(self, ids: list[int]) -> str:
        if self._hf is not None:
            return self._hf.decode(ids)
        return "".join(self.chars[i] for i in ids)


def char_tokenizer(text: str) -> dict[str, Any]:
    """The spec's char tokenizer over the sorted characters of `text`."""
    return {"kind": "char", "chars": "".join(sorted(set(text)))}
