"""The CUDA backend: the C backend's program with its forward pass on a GPU.

Decisions taken here (templates/cuda/ only renders text):

- Everything but the forward pass is the C backend's: the same lowering
  (`backends.c.lower`), so the same weights blob linked by `weights.S`, the same
  `model.c`, and the shared command line (`crystal_cli.c`), which gives every
  target one command line and one sampler. One difference: an untied float32
  head is stored plain, [V, D] like every other tensor, not in the tiles that
  crystal_forward.c packs for the CPU (`lower(head_tiles=False)`).
- `crystal_forward.cu` implements crystal.h's forward functions with one kernel
  per IR op; the weights go to the GPU once, as float32, integer tensors
  dequantized on the host exactly as the IR defines it.
- Positions run one at a time (a window is its positions in order): the
  simplest correct order on a KV cache; batching a window's positions into
  matrix products is the C backend's speed work, not yet done here.
"""

from __future__ import annotations

from pathlib import Path

from crystalc.backends.c import UNSAFE_CFLAGS, lower
from crystalc.backends.tools import run_tool
from crystalc.ir.graph import Graph
from crystalc.templating import copy_template, render

DEFAULT_NVCCFLAGS = "-O3"
SHARED_C = ("crystal.h", "unicode_classes.h", "crystal_cli.c")


class CudaBackend:
    name = "cuda"

    def emit(self, graph: Graph, out_dir: Path) -> list[Path]:
        """Write model.h, model.c, weights.S, weights.bin (as the C backend, the head untiled), main.c,
        crystal_forward.cu, the shared crystal.h and crystal_cli.c, and a Makefile into out_dir.

        No options: a name given by mistake is a TypeError, not silently ignored."""
        graph.verify()
        out_dir = Path(out_dir)
        ctx, blob = lower(graph, head_tiles=False)
        written = []
        for target, template, name in (("c", "model.h.j2", "model.h"), ("c", "model.c.j2", "model.c"),
                                       ("c", "weights.S.j2", "weights.S"), ("cuda", "main.c.j2", "main.c"),
                                       ("cuda", "Makefile.j2", "Makefile")):
            path = out_dir / name
            path.write_text(render(target, template, **ctx, default_nvccflags=DEFAULT_NVCCFLAGS,
                                   unsafe_cflags=" ".join(UNSAFE_CFLAGS), forward_source="crystal_forward.cu"),
                            encoding="utf-8")
            written.append(path)
        (out_dir / "weights.bin").write_bytes(blob)
        written.append(out_dir / "weights.bin")
        written += [copy_template("c", name, out_dir) for name in SHARED_C]
        written.append(copy_template("cuda", "crystal_forward.cu", out_dir))
        return written

    def build(self, out_dir: Path) -> Path:
        """Run `make` in out_dir: nvcc compiles the forward pass, cc the rest. No options (other flags:
        `make -C out_dir NVCCFLAGS=...`, as docs/backends.md shows)."""
        cmd = ["make", "-s", "-C", str(out_dir), "model"]
        run_tool(cmd, ("make", "nvcc", "cc"), "building the CUDA model")
        return Path(out_dir) / "model"


BACKEND = CudaBackend()
