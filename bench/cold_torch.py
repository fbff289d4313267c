"""Cold start, the PyTorch side: a fresh Python process loads the checkpoint with torch and
generates greedily, exactly what a user would run instead of the compiled program.

    python bench/cold_torch.py MODEL.pt 5,17,3 100

Same semantics as `model --prompt-ids 5,17,3 -n 100 -t 0` (default --shift 1: the exact
sliding window past T). Prints the generated ids, space-separated.
"""

from __future__ import annotations

import sys

import torch
from torch_gen import generate_recompute

from crystalc.config import ModelConfig
from crystalc.model import CrystalLM


def main(path: str, prompt: str, n: int) -> None:
    torch.set_num_threads(1)
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    model = CrystalLM(ModelConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    ids = [int(x) for x in prompt.split(",")]
    print(" ".join(str(t) for t in generate_recompute(model, ids, n)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
