"""The prune-vocab pass: keep only the vocabulary rows a corpus uses.

A model trained with a large tokenizer and deployed on narrower text pays for
every unused row of token_embed and head. This pass tokenizes a corpus with the
model's own tokenizer, keeps the ids that occur (plus ids asked for explicitly),
and slices token_embed, head.weight and head.bias down to those rows. Rows are
copied, never recomputed, so quantized rows keep their codes and scales and a
kept token's logit is computed from exactly the same numbers as before.

Ids stay those of the original tokenizer: Graph.vocab_map[i] is the original id
of current row i (strictly increasing) and Graph.orig_vocab_size the tokenizer's
size. Pruning a pruned graph composes the maps (the original ids survive).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from crystalc.errors import CrystalError
from crystalc.ir.graph import Graph
from crystalc.ir.tensor import Quant, Tensor
from crystalc.tokenizer import Tokenizer


def slice_rows(t: Tensor, rows: np.ndarray) -> Tensor:
    """Rows of a 2-D tensor, or entries of a 1-D one, with their quantization parameters.

    Values of the kept rows are bit-identical: codes are copied and each row keeps
    its own scale (row/group) or the tensor's shared one (tensor). A 1-D tensor is
    one row under `row` (one shared scale), so its scale is kept whole.
    """
    data = np.ascontiguousarray(t.data[rows])
    q = t.quant
    if q is None:
        return Tensor(t.name, data)
    if q.scheme == "tensor" or t.data.ndim == 1:
        return Tensor(t.name, data, q)
    return Tensor(t.name, data, Quant(q.scheme, np.ascontiguousarray(q.scale[rows]),
                                      np.ascontiguousarray(q.offset[rows]), q.group))


def corpus_ids(graph: Graph, corpus_text: str) -> tuple[np.ndarray, int]:
    """Original ids occurring in the corpus, and how many characters were skipped.

    A char tokenizer skips characters it lacks (they cannot be generated anyway);
    a BPE tokenizer maps them as it was trained to.
    """
    if graph.tokenizer is None:
        raise CrystalError("the model has no tokenizer, so a corpus cannot be tokenized: give the ids to keep "
                           "explicitly (--keep)")
    tok = Tokenizer(graph.tokenizer, graph.original_vocab_size)
    ids = tok.encode(corpus_text, strict=False)
    skipped = len(corpus_text) - len(ids) if tok.kind == "char" else 0
    return np.unique(np.asarray(ids, dtype=np.int64)), skipped


def prune_vocab(graph: Graph, corpus_text: str | None, keep_ids: list[int] | tuple[int, ...] = ()) -> Graph:
    """A verified copy of `graph` whose vocabulary is the corpus' tokens plus `keep_ids` (original ids)."""
    n_orig = graph.original_vocab_size
    current_orig = graph.original_ids()
    wanted: list[np.ndarray] = []
    skipped = 0
    removed = 0  # distinct corpus tokens a previous pruning removed: they cannot come back
    if corpus_text:
        ids, skipped = corpus_ids(graph, corpus_text)
        removed = int(np.count_nonzero(~np.isin(ids, current_orig)))
        wanted.append(ids)
    elif not keep_ids:
        raise CrystalError("nothing to keep: " + ("the corpus is empty" if corpus_text is not None else "no corpus")
                           + " and no ids were given")
    if keep_ids:
        graph.to_current_ids(list(keep_ids))  # raises for ids out of range or already pruned
        wanted.append(np.asarray(list(keep_ids), dtype=np.int64))
    want = np.unique(np.concatenate(wanted)) if wanted else np.zeros(0, dtype=np.int64)
    # rows of the current vocabulary whose original id is wanted; ids a previous
    # pruning removed cannot come back, and are simply not found here
    rows = np.flatnonzero(np.isin(current_orig, want))
    if rows.size == 0:
        raise CrystalError("no token of the corpus is in the model's vocabulary: nothing would be kept")
    new_map = np.ascontiguousarray(current_orig[rows], dtype=np.int64)

    head = graph.head
    head = dataclasses.replace(
        head,
        weight=None if head.weight is None else slice_rows(head.weight, rows),
        bias=slice_rows(head.bias, rows),
    )
    meta = dict(graph.meta)
    meta["prune_vocab"] = {
        "kept": int(rows.size), "of": int(graph.config.vocab_size), "orig_vocab_size": int(n_orig),
        "skipped_chars": int(skipped), "removed_tokens": removed,
    }
    return graph.replace(
        config=dataclasses.replace(graph.config, vocab_size=int(rows.size)),
        token_embed=dataclasses.replace(graph.token_embed, weight=slice_rows(graph.token_embed.weight, rows)),
        head=head,
        vocab_map=new_map,
        orig_vocab_size=int(n_orig),
        meta=meta,
    ).verify()
