"""Front end: read a model file of any supported kind and lower it to a verified Graph."""

from __future__ import annotations

from pathlib import Path

from crystalc.errors import CrystalError
from crystalc.fsutil import model_file
from crystalc.ir.graph import Graph

CRYSTAL_MAGIC = b"CRYS"
TORCH_MAGICS = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; the legacy format's pickle (protocol >= 2)


def load_model(path: str | Path, n_heads: int | None = None) -> Graph:
    """A Graph from a .pt, .safetensors (+ JSON config) or .crystal file.

    The kind is decided by the file's first bytes, not its name, so a mislabelled
    file gets the right reader or a clear error (a file named .safetensors that starts
    like no kind gets the safetensors reader's error; a PyTorch checkpoint so named is
    read as one).
    """
    path = model_file(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == CRYSTAL_MAGIC:
        from crystalc.format.crystal import read_crystal

        graph = read_crystal(path)
        if n_heads is not None and n_heads != graph.config.n_heads:
            raise CrystalError(f"{path}: --n-heads {n_heads} disagrees with the file's n_heads {graph.config.n_heads}")
        return _tokenizer_checked(path, graph)
    # safetensors: a little-endian u64 header length, then the JSON header itself; checked before
    # torch's magics, since a length's low byte can be a pickle's 0x80
    if head[8:9] == b"{" or (path.suffix == ".safetensors" and not head.startswith(TORCH_MAGICS)):
        from crystalc.frontend.safetensors_ckpt import read_safetensors

        raw = read_safetensors(path)
    elif not head.startswith(TORCH_MAGICS):
        # say what the file is not, instead of passing torch.load's parse error through
        what = "an empty file" if not head else "not a model file"
        raise CrystalError(f"{path}: {what}: expected a .crystal file (magic CRYS), a PyTorch checkpoint "
                           "(zip or pickle) or a .safetensors file")
    else:
        from crystalc.frontend.torch_ckpt import read_torch_checkpoint

        raw = read_torch_checkpoint(path)
    from crystalc.frontend.lower import lower

    try:
        graph = lower(raw, n_heads=n_heads)
    except CrystalError as e:
        # a config read from a JSON beside the weights may be the wrong one (an unrelated config.json): name it
        beside = f" (config from {raw.config_source})" if raw.config_source else ""
        raise CrystalError(f"{path}{beside}: {e}") from None
    return _tokenizer_checked(path, graph)


def _tokenizer_checked(path: Path, graph: Graph) -> Graph:
    """Graph.verify checks a Hugging Face tokenizer's record, not its JSON (parsing it costs more than a
    verify should): parsed here, so that a broken one is said of its file now, not by a later command that
    encodes a prompt, nor copied into outputs. Without the optional tokenizers package (the [bpe] extra)
    the commands that only carry the tokenizer still run: its JSON is then checked as JSON alone."""
    if graph.tokenizer is None or graph.tokenizer.get("kind") != "hf-tokenizers":
        return graph
    import importlib.util

    if importlib.util.find_spec("tokenizers") is None:
        import json

        try:
            json.loads(graph.tokenizer["json"])
        except (ValueError, RecursionError) as e:
            raise CrystalError(f"{path}: tokenizer: bad tokenizer.json: {e}") from None
        return graph
    from crystalc.tokenizer import Tokenizer

    try:
        Tokenizer(graph.tokenizer, graph.original_vocab_size)
    except CrystalError as e:
        raise CrystalError(f"{path}: {e}") from None
    return graph
