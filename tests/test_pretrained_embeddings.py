"""scripts/pretrained_embeddings.py (docs/quantization.md's model on MiniLM's embeddings) on a stand-in for the
pretrained model's folder: a tiny WordPiece tokenizer and embeddings of D 384, as the script's model has."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from crystalc.frontend import load_model
from crystalc.tokenizer import Tokenizer as ModelTokenizer

SCRIPT = Path(__file__).parents[1] / "scripts" / "pretrained_embeddings.py"
CORPUS = "the king is dead. long live the king! the queen is kind.\n" * 40


def pretrained(folder: Path) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
    """A BERT-like model's files: the tokenizer and its two embeddings (seeded random rows)."""
    pieces = ["[PAD]", "[UNK]", "[CLS]", "zebra", "the", "king", "is", "dead", "long", "live", "queen", "kind",
              ".", "!", "k", "##ing", "##s"]
    vocab = {p: i for i, p in enumerate(pieces)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    rng = np.random.default_rng(0)
    words, positions = (rng.standard_normal(shape).astype(np.float32) for shape in ((len(pieces), 384), (16, 384)))
    save_file({"embeddings.word_embeddings.weight": words, "embeddings.position_embeddings.weight": positions},
              str(folder / "model.safetensors"))
    return vocab, words, positions


def test_the_model_keeps_the_corpus_tokens_and_the_pretrained_rows_as_they_are(tmp_path):
    vocab, words, positions = pretrained(tmp_path / "minilm")
    (tmp_path / "corpus.txt").write_text(CORPUS)
    out = tmp_path / "m.pt"
    subprocess.run([sys.executable, str(SCRIPT), "--pretrained", str(tmp_path / "minilm"), "--corpus",
                    str(tmp_path / "corpus.txt"), "--out", str(out), "--steps", "3", "--n-ctx", "8"],
                   check=True, capture_output=True, text=True, timeout=300)
    graph = load_model(out)
    kept = ["[UNK]", "the", "king", "is", "dead", "long", "live", "queen", "kind", ".", "!"]  # sorted by old id
    assert graph.config.vocab_size == len(kept)
    tok = ModelTokenizer(graph.tokenizer, graph.config.vocab_size)
    assert tok.decode(tok.encode("the queen is dead")) == "the queen is dead"
    assert tok.encode("zebra") == [0]  # a token the corpus lacks is gone: [UNK], the first kept
    emb = {t.name: t.values() for t in graph.tensors()}
    np.testing.assert_array_equal(emb["token_embed.weight"], words[[vocab[p] for p in kept]])
    np.testing.assert_array_equal(emb["pos_embed.weight"], positions[:8])
    cut = int(len(CORPUS) * 0.9)
    assert Path(f"{out}.heldout.txt").read_text() == CORPUS[cut:]
    trained = torch.load(out, weights_only=True)["model"]["blocks.0.ffn.fc1.weight"]
    assert trained.shape == (768, 384)
