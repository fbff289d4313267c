"""The quality report: what each quantization mode x granularity costs in size and accuracy.

For every combination (and the float32 baseline) the report gives the size of the
.crystal file, the compression ratio, the cross-entropy and perplexity of a held-out
corpus, the top-1 agreement with float32 and the largest logit error, all computed
with the numpy reference interpreter.

Speed: the corpus is cut into windows of n_ctx tokens and a batch of windows goes
through the interpreter's own op functions at once. Every op but attention works
per position, so those run on all positions of the batch flattened together;
attention runs window by window with interpret.causal_attention. The quantized
weights are dequantized once up front with Tensor.values() (the one definition).
tests/test_evaluate.py checks forward_windows against interpret.forward.

sensitivity() is the same scoring one tensor at a time: each tensor a mode quantizes
is swapped alone into the float32 graph, so the report says which tensor a scheme hurts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from crystalc.errors import CrystalError
from crystalc.ir import interpret
from crystalc.ir.graph import Graph
from crystalc.ir.tensor import Tensor
from crystalc.passes.quantize import MODES, check_mode, parse_granularity, quantize
from crystalc.tokenizer import Tokenizer

DEFAULT_GRANULARITIES = ("tensor", "row", "group:32")


@dataclass(frozen=True)
class CorpusNotes:
    """What the scored text left out or was scored with, said under every report."""

    n_tokens: int  # predicted positions
    dropped_tokens: int = 0  # corpus tokens absent from a pruned vocabulary, left out of the sequence
    unknown_chars: int = 0  # corpus characters the tokenizer lacks, skipped
    calibration_tokens: int = 0  # tokens of calibration text the quantized rows' rounding used; 0: nearest
    quantized_input: int = 0  # tensors the input model held quantized: "float32" is their dequantized values

    def markdown(self) -> str:
        notes = ["1 predicted token" if self.n_tokens == 1 else f"{self.n_tokens:,} predicted tokens"]
        if self.calibration_tokens:
            notes.append(f"codes by calibrated rounding on {self.calibration_tokens:,} tokens of calibration text")
        if self.quantized_input:
            notes.append(f"the input was quantized ({self.quantized_input:,} tensors): its float32 row is those "
                         "tensors dequantized, not the model they were quantized from")
        if self.unknown_chars:
            notes.append(f"{self.unknown_chars:,} corpus characters the tokenizer lacks skipped")
        if self.dropped_tokens:
            tokens = "token" if self.dropped_tokens == 1 else "tokens"
            notes.append(f"{self.dropped_tokens:,} corpus {tokens} outside the pruned vocabulary left out (perplexity "
                         "over the kept vocabulary: not comparable with the unpruned model's)")
        return "; ".join(notes)


@dataclass(frozen=True)
class EvalRow:
    mode: str  # "float32" or a quantize mode
    granularity: str  # "-" for float32
    nbytes: int
    cross_entropy: float  # nats per token
    perplexity: float
    top1_agreement: float  # fraction of positions whose argmax equals float32's
    max_logit_error: float  # max |logit - float32 logit| over positions and vocabulary


@dataclass(frozen=True)
class EvalReport:
    rows: tuple[EvalRow, ...]  # nbytes: of the written .crystal file
    corpus: CorpusNotes


def _dequantized(graph: Graph) -> Graph:
    """The same graph with every quantized tensor replaced by its float32 values, and no record of the
    quantization it no longer has (which the float32 row's file size would count)."""
    out = graph.map_tensors(lambda t: t if t.quant is None else Tensor(t.name, t.values()))
    if "quantize" in out.meta:
        out = out.replace(meta={k: v for k, v in out.meta.items() if k != "quantize"})
    out.verify()  # a pass, as any other: its output checked
    return out


def forward_windows(graph: Graph, windows: np.ndarray) -> np.ndarray:
    """Logits [B,S,V] of B windows of current ids [B,S], in batches that bound memory."""
    g = _dequantized(graph)
    b, s = windows.shape
    if not 1 <= s <= g.config.n_ctx:
        raise CrystalError(f"windows of {s} tokens; the model takes 1..{g.config.n_ctx}")
    per_batch = interpret.windows_per_batch(g.config, s)
    out = [interpret.forward_batch(g, windows[i:i + per_batch]) for i in range(0, b, per_batch)]
    return np.concatenate(out) if out else np.zeros((0, s, g.config.vocab_size), dtype=np.float32)


def corpus_to_ids(graph: Graph, text: str, max_tokens: int | None) -> tuple[np.ndarray, int, int]:
    """Current-vocabulary ids of the first max_tokens + 1 tokens of `text` (max_tokens predictions), how many of
    those a pruned vocabulary lacked (left out), and how many characters the tokenizer lacked (skipped)."""
    if graph.tokenizer is None:
        raise CrystalError("the model has no tokenizer: eval needs one to read the corpus")
    tokenizer = Tokenizer(graph.tokenizer, graph.original_vocab_size)
    ids, unknown = tokenizer.encode_counted(text, limit=None if max_tokens is None else max_tokens + 1)
    kept, dropped = graph.known_rows(ids)
    if kept.size < 2:
        within = "" if max_tokens is None else f" (of the first {max_tokens + 1:,} tokens: --max-tokens)"
        raise CrystalError(f"the corpus holds fewer than 2 tokens the model knows{within}: nothing to evaluate")
    return kept, dropped, unknown


def _split(ids: np.ndarray, t: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(inputs [B,S], targets [B,S]) groups: full windows of t, then the shorter last one."""
    n_pred = ids.size - 1
    full = n_pred // t
    groups = []
    if full:
        idx = np.arange(full)[:, None] * t + np.arange(t)[None, :]
        groups.append((ids[idx], ids[idx + 1]))
    rest = n_pred - full * t
    if rest:
        start = full * t
        groups.append((ids[None, start:start + rest], ids[None, start + 1:start + 1 + rest]))
    return groups


def _scored_positions(graph: Graph, corpus_text: str, max_tokens: int | None, calibration: np.ndarray | None
                      ) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, CorpusNotes]:
    """The corpus as (inputs, targets) window groups, all targets in order, and the notes on what was left out."""
    ids, dropped, unknown = corpus_to_ids(graph, corpus_text, max_tokens)
    groups = _split(ids, graph.config.n_ctx)
    targets = np.concatenate([y.reshape(-1) for _, y in groups])
    n_cal = 0 if calibration is None else int(np.asarray(calibration).size)
    quantized = sum(t.quant is not None for t in graph.tensors())
    return groups, targets, CorpusNotes(int(targets.size), dropped, unknown, n_cal, quantized)


def _logits(graph: Graph, groups: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Logits of every predicted position, [n_pred, V], in corpus order."""
    v = graph.config.vocab_size
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow shows as inf/nan, which the scores report
        return np.concatenate([forward_windows(graph, x).reshape(-1, v) for x, _ in groups])


def _reference_logits(graph: Graph, groups: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """float32's logits, which every score is measured against: they must be finite to measure anything."""
    logits = _logits(graph, groups)
    bad = ~np.isfinite(logits)
    if bad.any():
        row = int(np.argmax(bad.any(axis=-1)))
        raise CrystalError(f"the model's float32 logits are not finite (first at scored position {row}): "
                           "its weights overflow float32 arithmetic, so there is no reference to compare with")
    return logits


def _exp(x: float) -> float:
    """math.exp, but inf past float64's range: a model may be bad enough that its perplexity overflows."""
    return math.inf if x > 709.0 else math.exp(x)


def _ppl_change(ce: float, base_ce: float) -> float:
    """The perplexity's relative change, taken from the cross-entropies (both may overflow as perplexities)."""
    return _exp(ce - base_ce) - 1


def _log_softmax(z: np.ndarray) -> np.ndarray:
    """log softmax over each row, shifted by the row's max so exp never overflows."""
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _nll(logits: np.ndarray, targets: np.ndarray, rows: int = 1024) -> np.ndarray:
    """-log softmax(logits)[target] per position, in float64, a slice of rows at a time (bounded memory)."""
    out = np.empty(logits.shape[0], dtype=np.float64)
    for i in range(0, logits.shape[0], rows):
        lp = _log_softmax(logits[i:i + rows].astype(np.float64))
        out[i:i + rows] = -lp[np.arange(lp.shape[0]), targets[i:i + rows]]
    return out


def _kl(logits: np.ndarray, ref_logits: np.ndarray, rows: int = 1024) -> float:
    """Mean over positions of KL(softmax(ref) || softmax(logits)) in nats: how far the predicted
    distributions moved, never negative (unlike a perplexity change, which noise can make so)."""
    total = 0.0
    for i in range(0, logits.shape[0], rows):
        lp, lq = (_log_softmax(z[i:i + rows].astype(np.float64)) for z in (ref_logits, logits))
        total += float(np.sum(np.exp(lp) * (lp - lq)))
    return total / max(1, logits.shape[0])


def _max_abs_diff(a: np.ndarray, b: np.ndarray, rows: int = 1024) -> float:
    return max((float(np.abs(a[i:i + rows] - b[i:i + rows]).max()) for i in range(0, a.shape[0], rows)),
               default=0.0)


def _scores(logits: np.ndarray, targets: np.ndarray, ref_logits: np.ndarray) -> tuple[float, float, float]:
    """(cross-entropy, top-1 agreement with ref_logits, max |logit - ref|)."""
    return (float(np.mean(_nll(logits, targets))),
            float(np.mean(logits.argmax(axis=1) == ref_logits.argmax(axis=1))),
            _max_abs_diff(logits, ref_logits))


def crystal_size(graph: Graph) -> int:
    """Bytes of the graph's .crystal file."""
    from crystalc.format.crystal import encode_crystal

    return len(encode_crystal(graph))


def checked_options(modes: Sequence[str], granularities: Sequence[str]) -> tuple[list[str], list[str]]:
    """Raise CrystalError on an unknown mode or granularity; both lists in canonical form, each entry once
    (group:032 is group:32), in the order given."""
    for m in modes:
        check_mode(m)
    return list(dict.fromkeys(modes)), list(dict.fromkeys(str(parse_granularity(gr)) for gr in granularities))


def evaluate(
    graph: Graph,
    corpus_text: str,
    modes: Sequence[str] = MODES,
    granularities: Sequence[str] = DEFAULT_GRANULARITIES,
    max_tokens: int | None = 8192,
    progress: Callable[[int, int, str], None] | None = None,
    calibration: np.ndarray | None = None,
) -> EvalReport:
    """The quality report of `graph` (taken as the float32 reference) on a held-out corpus.
    `calibration`: windows of current ids for calibrated rounding (quantize's `calibration`)."""
    modes, grans = checked_options(modes, granularities)
    groups, targets, notes = _scored_positions(graph, corpus_text, max_tokens, calibration)
    jobs: list[tuple[str, str]] = [("float32", "-")] + [(m, gr) for m in modes for gr in grans]
    base = _dequantized(graph)
    ref_logits: np.ndarray | None = None
    rows = []
    for i, (mode, gran) in enumerate(jobs):
        if progress is not None:
            progress(i, len(jobs), f"{mode} {gran}")
        g = base if mode == "float32" else quantize(base, mode, gran, calibration=calibration)
        nbytes = crystal_size(g)
        if ref_logits is None:  # the first job, float32
            ref_logits = logits = _reference_logits(g, groups)
        else:
            logits = _logits(g, groups)
        ce, top1, err = _scores(logits, targets, ref_logits)
        rows.append(EvalRow(mode=mode, granularity=gran, nbytes=nbytes, cross_entropy=ce,
                            perplexity=_exp(ce), top1_agreement=top1, max_logit_error=err))
    if progress is not None:
        progress(len(jobs), len(jobs), "done")
    return EvalReport(tuple(rows), notes)


def markdown(report: EvalReport) -> str:
    """The report as a Markdown table, float32 first; stable formatting for the README."""
    base = report.rows[0]
    lines = [
        "| mode | granularity | file bytes | ratio | cross-entropy (nats) | perplexity | ppl vs f32 "
        "| top-1 agree | max logit err |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.rows:
        lines.append(
            f"| {r.mode} | {r.granularity} | {r.nbytes:,} | {base.nbytes / r.nbytes:.2f}x | "
            f"{r.cross_entropy:.4f} | {r.perplexity:.4f} | "
            f"{100 * _ppl_change(r.cross_entropy, base.cross_entropy):+.2f}% | "
            f"{100 * r.top1_agreement:.2f}% | {r.max_logit_error:.4g} |"
        )
    return "\n".join(lines) + "\n\n" + report.corpus.markdown() + ".\n"


@dataclass(frozen=True)
class TensorRow:
    """What quantizing one tensor alone (all others float32) costs."""

    name: str  # "(all)" for every tensor the mode quantizes at once
    shape: tuple[int, ...]
    # max |x - mean(x)| / std(x) of the float32 tensor: the span one min/max scale must cover; nan for "(all)"
    peak_over_std: float
    kl_divergence: float  # mean KL(float32 || this) over positions, nats: the ranking key
    cross_entropy: float
    top1_agreement: float
    max_logit_error: float


@dataclass(frozen=True)
class SensitivityReport:
    mode: str
    granularity: str
    base_cross_entropy: float  # float32
    rows: tuple[TensorRow, ...]  # largest KL divergence first (then name); the "(all)" row last
    corpus: CorpusNotes


def sensitivity(
    graph: Graph,
    corpus_text: str,
    mode: str,
    granularity: str,
    max_tokens: int | None = 8192,
    progress: Callable[[int, int, str], None] | None = None,
    calibration: np.ndarray | None = None,
) -> SensitivityReport:
    """Per-tensor cost of `mode` at `granularity`: each tensor the mode quantizes is swapped
    alone into the float32 graph and scored like evaluate() scores whole models, so the
    report names the tensors a scheme hurts (e.g. one whose outliers stretch a per-tensor
    scale) instead of leaving it to guesswork."""
    check_mode(mode)
    gran = str(parse_granularity(granularity))
    base = _dequantized(graph)
    quantized = quantize(base, mode, gran, calibration=calibration)
    swapped = {t.name: t for t in quantized.tensors() if t.quant is not None}
    groups, targets, notes = _scored_positions(graph, corpus_text, max_tokens, calibration)
    ref = _reference_logits(base, groups)
    base_ce = float(np.mean(_nll(ref, targets)))
    # an empty tensor (a block of 0 neurons) quantizes to nothing: no row to report
    originals = [t for t in base.tensors() if t.name in swapped and t.data.size]

    def alone(name: str) -> Graph:
        one = base.map_tensors(lambda u: swapped[u.name] if u.name == name else u)
        one.verify()
        return one

    rows = []
    for i, t in enumerate(originals):
        if progress is not None:
            progress(i, len(originals) + 1, f"{mode} {gran} {t.name}")
        x = t.values().astype(np.float64)
        sd = float(x.std())
        peak = float(np.abs(x - x.mean()).max()) / sd if sd > 0 else 0.0
        logits = _logits(alone(t.name), groups)
        rows.append(TensorRow(t.name, tuple(t.shape), peak, _kl(logits, ref), *_scores(logits, targets, ref)))
    rows.sort(key=lambda r: (-r.kl_divergence, r.name))
    if progress is not None:
        progress(len(originals), len(originals) + 1, f"{mode} {gran} (all)")
    logits = _logits(quantized, groups)
    rows.append(TensorRow("(all)", (), math.nan, _kl(logits, ref), *_scores(logits, targets, ref)))
    if progress is not None:
        progress(len(originals) + 1, len(originals) + 1, "done")
    return SensitivityReport(mode, gran, base_ce, tuple(rows), notes)


def sensitivity_markdown(report: SensitivityReport) -> str:
    """The per-tensor report as a Markdown table, the tensor that moves the predictions most first."""
    base_ppl = _exp(report.base_cross_entropy)
    lines = [
        f"{report.mode} {report.granularity}, one tensor at a time (the rest float32):",
        "",
        "| tensor | shape | peak/std | KL from f32 (nats) | ppl vs f32 | top-1 agree | max logit err |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report.rows:
        shape = "x".join(map(str, r.shape)) if r.shape else "-"
        peak = "-" if math.isnan(r.peak_over_std) else f"{r.peak_over_std:.1f}"
        lines.append(f"| {r.name} | {shape} | {peak} | {r.kl_divergence:.3g} | "
                     f"{100 * _ppl_change(r.cross_entropy, report.base_cross_entropy):+.3f}% | "
                     f"{100 * r.top1_agreement:.2f}% | {r.max_logit_error:.4g} |")
    return "\n".join(lines) + f"\n\n{report.corpus.markdown()}; float32 perplexity {base_ppl:.4f}.\n"


def timed_progress(echo: Callable[[str], None]) -> Callable[[int, int, str], None]:
    """A progress callback printing one line per job with the time the previous one took."""
    last = [time.monotonic()]

    def report(i: int, n: int, label: str) -> None:
        now = time.monotonic()
        took = "" if i == 0 else f" (previous took {now - last[0]:.1f}s)"
        last[0] = now
        echo(f"eval [{i}/{n}] {label}{took}")

    return report
