"""The crystalc command line: parse options, call the library, print. Nothing else lives here.

Every failure caused by the user's input is a CrystalError (or a click usage
error) and ends as one line on stderr with exit status 2.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from click.core import ParameterSource

from crystalc.backends import BACKENDS
from crystalc.errors import CrystalError, one_line

if TYPE_CHECKING:  # the library is imported lazily, so that `--help` starts fast
    import numpy as np

    from crystalc.ir.graph import Graph

TARGETS = tuple(BACKENDS)
QUANT_MODES = ("int8", "int16", "mixed", "mixed8")
MAX_STEPS = 10**9  # as -n: more is no run that ends (a typo's 10^20 steps showed an ETA of 10^14 hours)


class FiniteRange(click.FloatRange):
    """A FloatRange that also refuses nan and inf, which click's range checks let through."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return v


class OnceCommand(click.Command):
    """A command whose options may each be given once: click keeps the last of two values, a guess at which
    one was meant (`-o a.crystal ... -o b.crystal`), so a repeat is refused instead."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not ctx.resilient_parsing:  # a dry parse for the order options came in; click parses for real below
            _, _, order = self.make_parser(ctx).parse_args(args=list(args))
            seen: set[str] = set()
            for param in order:
                if isinstance(param, click.Option) and not (param.multiple or param.count):
                    name = max(param.opts, key=len)
                    if name in seen:
                        raise click.UsageError(f"{name} given twice", ctx)
                    seen.add(name)
        return super().parse_args(ctx, args)


class CrystalGroup(click.Group):
    command_class = OnceCommand


def _check_output(out: str, **inputs: str | None) -> None:
    """An output must not replace what it is made from (`quantize m.pt -o m.pt`, `compile out/m.pt -o out`),
    and must be writable: checked before the work, not after it."""
    from crystalc.fsutil import check_writable

    check_writable(out)
    o = _resolved(out)
    for what, path in inputs.items():
        if path is None:
            continue
        p = _resolved(path)
        if p == o or o in p.parents:
            raise CrystalError(f"the output {out} would replace the {what.replace('_', ' ')} {path}: "
                               "choose another output path")


def _resolved(path: str) -> Path:
    """The path with its links followed, where that can be done; else as written, made absolute (a link
    loop, a name too long: reading or writing it says what is wrong, and it is nothing else's path)."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # RuntimeError: Python 3.11's word for a link loop
        return Path(os.path.abspath(path))


def _load(path: str, n_heads: int | None = None) -> Graph:
    from crystalc.frontend import load_model

    return load_model(path, n_heads=n_heads)


DEFAULT_CALIBRATE_TOKENS = 16384


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one is missing: its reader names it
        return False


def _check_calibration(path: str | None, max_tokens: int | None) -> None:
    if path is None and max_tokens is not None:
        raise CrystalError("--calibrate-tokens sizes the --calibrate text: give --calibrate too")


def _calibration(graph: Graph, path: str | None, max_tokens: int | None) -> np.ndarray | None:
    """Windows of `path`'s tokens for calibrated rounding, or None."""
    _check_calibration(path, max_tokens)
    if path is None:
        return None
    from crystalc.passes.calibrate import calibration_windows

    return calibration_windows(graph, _read_text(path, "calibration text"), max_tokens or DEFAULT_CALIBRATE_TOKENS)


def _apply_passes(graph: Graph, prune_corpus: str | None, keep: str | None, quantize: str | None,
                  granularity: str | None, calibrate: str | None = None,
                  calibrate_tokens: int | None = None) -> Graph:
    """Checks the options, then runs passes.pipeline's one order (prune_vocab, then quantize)."""
    from crystalc.passes.pipeline import run_pipeline, standard_passes

    _check_calibration(calibrate, calibrate_tokens)  # before the (slower) passes
    if quantize is None and calibrate is not None:
        raise CrystalError("--calibrate chooses how weights are rounded: it needs a quantization mode")
    if quantize is None and granularity is not None:
        raise CrystalError("--granularity chooses the quantization scales: it needs a quantization mode")
    text = _read_text(prune_corpus) if prune_corpus is not None else None
    passes = standard_passes(text, _parse_ids(keep) if keep is not None else [], quantize, granularity,
                             lambda g: _calibration(g, calibrate, calibrate_tokens))
    return run_pipeline(graph, passes)


def _read_text(path: str, what: str = "corpus") -> str:
    from crystalc.fsutil import read_text

    return read_text(path, what)


def _parse_ids(text: str) -> list[int]:
    """Comma-separated ids, as the generated programs read --prompt-ids: ASCII digits (a leading minus is
    left for the range check to name), no empty entries, spaces around them ignored."""
    items = [x.strip(" ") for x in text.split(",")]  # "1 2" is not 12
    if not all(x.removeprefix("-").isascii() and x.removeprefix("-").isdigit() for x in items):
        try:
            shown = repr(text)
            text.encode("utf-8")
        except UnicodeEncodeError:  # a command line's invalid UTF-8 arrives as lone surrogates: its bytes, shown
            shown = repr(text.encode("utf-8", "surrogateescape"))[1:]
        raise CrystalError(f"token ids must be comma-separated integers, got {shown}")
    # past int64 any id is out of every vocabulary's range, and past 4,300 digits int() itself refuses
    digits = max(len(x.removeprefix("-").lstrip("0")) for x in items)
    if digits > 19:
        raise CrystalError(f"token ids must be comma-separated integers of at most 19 digits, got one of {digits}")
    return [int(x) for x in items]


@click.group(cls=CrystalGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="crystalc")
def cli() -> None:
    """crystalc: compile crystal language models to C, CUDA, a Verilog core, or SPICE circuits.

    MODEL arguments accept a crystalc .pt checkpoint, a checkpoint saved by the
    original causal_crystal.py, a bare state_dict, a .safetensors file with a JSON
    config beside it, or a .crystal file.
    """


n_heads_option = click.option("--n-heads", type=click.IntRange(1), default=None,
                              help="Attention heads, for checkpoints whose config does not say.")
prune_option = click.option("--prune-vocab", "prune_corpus", type=click.Path(dir_okay=False), default=None,
                            help="Keep only the tokens that occur in this corpus.")
keep_option = click.option("--keep", default=None,
                           help="Original token ids to keep whatever the corpus holds, e.g. 0,1,2.")
quant_option = click.option("--quantize", type=click.Choice(QUANT_MODES), default=None,
                            help="Quantize weights: int8, int16, mixed (f32 embeddings + int16), "
                                 "mixed8 (f32 embeddings + int8).")
gran_option = click.option("--granularity", default=None,
                           help="Scale granularity: tensor (the seeds' min/max; the default), row, or group:N.")
calibrate_option = click.option(
    "--calibrate", type=click.Path(dir_okay=False), default=None,
    help="Text (e.g. training data) for calibrated rounding: the linear layers' codes are chosen to keep "
         "their outputs on this text close to float32 (GPTQ-style), instead of rounding each weight to "
         "the nearest code. Same scales and sizes: a .crystal file gains at most 64 bytes, the metadata that "
         "records the calibration (sections are 64-byte aligned); see docs/quantization.md.")
calibrate_tokens_option = click.option("--calibrate-tokens", type=click.IntRange(1), default=None,
                                       help=f"Tokens of the --calibrate text used (default: "
                                            f"{DEFAULT_CALIBRATE_TOKENS}).")


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--target", "-t", type=click.Choice(TARGETS), required=True,
              help="Backend to compile for: " + ", ".join(f"{name} ({t.summary})" for name, t in BACKENDS.items())
                   + ". docs/backends.md.")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Output folder; replaced as a whole only once everything is written (an existing one only "
                   "if it is empty or crystalc wrote it).")
@click.option("--build", is_flag=True, help="Also build the artifact with the target's tool and print its path.")
@click.option("--cflags", default=None, help="c: C compiler flags for --build (default: -O3 -march=native; "
                                             "fast math is refused).")
@click.option("--lanes", type=click.IntRange(1, 64), default=None,
              help="verilog: sums the core computes at once, one multiplier each: rows of a linear layer, "
                   "neurons and output components of the neuron field, attention scores and outputs (default 1).")
@click.option("--frozen-only", is_flag=True,
              help="spice: only the frozen (crystallised) neurons go into the circuits, which then output their "
                   "sums; the active neurons stay digital (the seeds' hybrid; docs/backends.md).")
@n_heads_option
@prune_option
@keep_option
@quant_option
@gran_option
@calibrate_option
@calibrate_tokens_option
def compile(model: str, target: str, out_dir: str, build: bool, cflags: str | None, lanes: int | None,
            frozen_only: bool, n_heads: int | None, prune_corpus: str | None, keep: str | None, quantize: str | None,
            granularity: str | None, calibrate: str | None, calibrate_tokens: int | None) -> None:
    """Compile MODEL for a target into the folder -o OUT."""
    from crystalc.backends import get_backend
    from crystalc.fsutil import atomic_dir

    for name, given in (("cflags", cflags is not None), ("lanes", lanes is not None), ("frozen_only", frozen_only)):
        owners = [t for t, spec in BACKENDS.items() if name in spec.options]
        if given and target not in owners:
            raise CrystalError(f"--{name.replace('_', '-')} applies to --target {' or '.join(owners)} only, "
                               f"not {target}")
    if cflags is not None and not build:
        raise CrystalError("--cflags are the flags of --build: add --build (or run make CFLAGS=... in OUT)")
    _check_output(out_dir, model=model, corpus=prune_corpus, calibration_text=calibrate)

    graph = _apply_passes(_load(model, n_heads), prune_corpus, keep, quantize, granularity, calibrate,
                          calibrate_tokens)
    backend = get_backend(target)
    product = None
    with atomic_dir(out_dir) as tmp:
        # only options given reach the backend, and only its own ones get past the checks above
        emit_options: dict[str, Any] = {"frozen_only": True} if frozen_only else {}
        if lanes is not None:
            emit_options["lanes"] = lanes
        backend.emit(graph, tmp, **emit_options)
        if build:
            try:
                product = backend.build(tmp, **({"cflags": cflags} if cflags is not None else {}))
            except CrystalError as e:  # named as the folder it was to be: the temporary one is gone with it
                raise CrystalError(f"{str(e).replace(str(tmp), str(out_dir))} (nothing written)") from None
    if product is not None:
        click.echo(str(Path(out_dir) / product.name))
    else:
        click.echo(f"wrote {out_dir}")


@cli.command()
@click.argument("out_dir", metavar="OUT", type=click.Path(file_okay=False, exists=True))
@click.option("--prompt", default=None, help="Text prompt (needs OUT/tokenizer.json, written when the model has one).")
@click.option("--prompt-ids", default=None, help="Comma-separated ids of the original tokenizer.")
@click.option("-n", "n_tokens", type=click.IntRange(0, 1_000_000_000), default=0, show_default=True,
              help="Greedy tokens for the hardware to generate after the prompt (0: print the logits).")
@click.option("--shift", type=int, default=None,
              help="With -n: tokens dropped when the window is full, 1..N_CTX (default 1: the exact sliding "
                   "window).")
@click.option("--simulator", type=click.Choice(["icarus", "verilator", "netlist"]), default="icarus",
              show_default=True,
              help="Icarus Verilog; Verilator (tens of times faster to run, seconds to build); or the netlist "
                   "Yosys synthesises from the design, written back as Verilog and run by Verilator.")
def simulate(out_dir: str, prompt: str | None, prompt_ids: str | None, n_tokens: int, shift: int | None,
             simulator: str) -> None:
    """Simulate the Verilog in OUT (crystalc compile --target verilog) on a prompt (its last N_CTX tokens).

    Prints the last position's logits as the programs' --logits does: "<original-id> <logit>", one line a row;
    with -n N, the N greedy tokens the hardware generates (crystal_gen, the spec's window): after --prompt, the
    prompt and the tokens as text; after --prompt-ids, the tokens' original ids separated by commas. On stderr,
    the clock cycles it took. Builds the simulation first when OUT lacks it.
    """
    from crystalc.backends.verilog import (
        check_prompt,
        compiled_tokenizer,
        compiled_window,
        simulate_generate,
        simulate_logits,
    )

    if (prompt is None) == (prompt_ids is None):
        raise CrystalError("give exactly one of --prompt and --prompt-ids")
    if shift is not None and not n_tokens:  # as the programs refuse a generation option beside --logits
        raise CrystalError("--shift has no effect without -n, which prints the prompt's logits and generates nothing")
    shift = 1 if shift is None else shift
    window = compiled_window(Path(out_dir))
    if not 1 <= shift <= window:
        raise CrystalError(f"--shift {shift} is outside 1..{window}")
    tokenizer = compiled_tokenizer(Path(out_dir)) if prompt is not None else None
    ids = tokenizer.encode(prompt) if tokenizer is not None and prompt is not None else _parse_ids(prompt_ids or "")
    if not ids:
        raise CrystalError("the prompt has no tokens")
    check_prompt(Path(out_dir), ids, tokenizer)  # before the simulation is built
    kept = ids[-window:]  # the spec: a prompt longer than the window keeps its last tokens
    if n_tokens:
        made, cycles = simulate_generate(Path(out_dir), kept, n_tokens, shift, simulator)
        click.echo(tokenizer.decode(ids + made) if tokenizer is not None else ",".join(str(i) for i in made))
        click.echo(f"{cycles:,} clock cycles for {len(kept)} + {n_tokens} tokens", err=True)
        return
    rows, cycles = simulate_logits(Path(out_dir), kept, simulator)
    for orig, logit in rows:
        click.echo(f"{orig} {logit:.9g}")
    click.echo(f"{cycles:,} clock cycles for {len(kept)} token{'s' if len(kept) != 1 else ''}", err=True)


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@n_heads_option
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Also draw the neuron field (PCA, frozen vs active) and the training curve to this .png "
                   "(or .svg) file.")
def inspect(model: str, n_heads: int | None, plot_path: str | None) -> None:
    """Print MODEL's ops, shapes, dtypes, parameter counts, bytes and frozen/active neurons."""
    if plot_path is not None:
        from crystalc.plot import plot_format

        plot_format(plot_path)
        _check_output(plot_path, model=model)
    graph = _load(model, n_heads)
    if plot_path is not None:  # first: a model whose curve cannot be drawn fails before printing anything
        from crystalc.plot import plot_model

        plot_model(graph, plot_path)
    click.echo(graph.text(), nl=False)
    if plot_path is not None:
        click.echo(f"wrote {plot_path}")


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--prompt", default=None,
              help="Text prompt (needs the model's tokenizer; a BPE prompt is encoded and the output decoded here).")
@click.option("--prompt-ids", default=None, help="Comma-separated token ids of the original tokenizer.")
@click.option("-n", "n_tokens", type=click.IntRange(0, 1_000_000_000), default=100, show_default=True,
              help="Tokens to generate.")
@click.option("-t", "temperature", type=FiniteRange(0), default=0.8, show_default=True,
              help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", type=FiniteRange(0, 1, min_open=True), default=0.9, show_default=True,
              help="Nucleus sampling: draw from the fewest most likely tokens whose probabilities reach P.")
@click.option("--seed", type=click.IntRange(-(1 << 63), (1 << 63) - 1), default=42, show_default=True,
              help="Sampler seed: same seed, same text.")
@click.option("--shift", type=click.IntRange(1), default=1, show_default=True,
              help="Tokens dropped when the context window is full.")
@click.option("--logits", is_flag=True, help="Print the last prompt position's logits instead of generating "
                                             "(the sampling options then have nothing to do and are refused).")
@n_heads_option
def run(model: str, prompt: str | None, prompt_ids: str | None, n_tokens: int, temperature: float,
        top_p: float, seed: int, shift: int, logits: bool, n_heads: int | None) -> None:
    """Run MODEL with the portable C runtime (built once and cached)."""
    from crystalc.runtime import run_model

    if (prompt is None) == (prompt_ids is None):
        raise CrystalError("give exactly one of --prompt and --prompt-ids")
    args = []
    if prompt_ids is not None:
        args += ["--prompt-ids", prompt_ids]
    # only what was asked for: the runtime's defaults are these options' defaults, and it refuses a sampling
    # option beside --logits, which a default passed on would trip
    ctx = click.get_current_context()
    for flag, name, value in (("-n", "n_tokens", str(n_tokens)), ("-t", "temperature", repr(temperature)),
                              ("--top-p", "top_p", repr(top_p)), ("--seed", "seed", str(seed)),
                              ("--shift", "shift", str(shift))):
        if ctx.get_parameter_source(name) != ParameterSource.DEFAULT:
            if logits:  # the runtime's words, said before a checkpoint is converted for it
                raise CrystalError(f"{flag} has no effect with --logits, which prints the prompt's logits and "
                                   "generates nothing")
            args += [flag, value]
    if logits:
        args.append("--logits")
    sys.exit(run_model(model, args, prompt=prompt, n_heads=n_heads))


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--int8", is_flag=True, help="Everything int8.")
@click.option("--int16", is_flag=True, help="Everything int16.")
@click.option("--mixed", is_flag=True, help="float32 embeddings, int16 everything else.")
@click.option("--mixed8", is_flag=True, help="float32 embeddings, int8 everything else.")
@gran_option
@calibrate_option
@calibrate_tokens_option
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False), required=True, help="Output .crystal file.")
@n_heads_option
def quantize(model: str, int8: bool, int16: bool, mixed: bool, mixed8: bool, granularity: str | None,
             calibrate: str | None, calibrate_tokens: int | None, out_path: str, n_heads: int | None) -> None:
    """Quantize MODEL and write a .crystal file."""
    from crystalc.format.crystal import write_crystal

    # separate flags, not one shared destination, so that two modes are an error rather than "last wins"
    chosen = [m for m, on in (("int8", int8), ("int16", int16), ("mixed", mixed), ("mixed8", mixed8)) if on]
    if len(chosen) != 1:
        got = f" (got {', '.join(f'--{m}' for m in chosen)})" if chosen else ""
        raise CrystalError(f"choose one mode: --int8, --int16, --mixed or --mixed8{got}")
    mode = chosen[0]
    _check_output(out_path, model=model, calibration_text=calibrate)
    graph = _apply_passes(_load(model, n_heads), None, None, mode, granularity, calibrate, calibrate_tokens)
    write_crystal(graph, out_path)
    click.echo(f"wrote {out_path} ({Path(out_path).stat().st_size:,} bytes)")


@cli.command("prune-vocab")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--corpus", type=click.Path(dir_okay=False), default=None,
              help="Text whose tokens are kept (needs the model's tokenizer).")
@keep_option
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False), required=True, help="Output .crystal file.")
@n_heads_option
def prune_vocab(model: str, corpus: str | None, keep: str | None, out_path: str, n_heads: int | None) -> None:
    """Keep only the vocabulary rows a corpus uses; ids stay those of the original tokenizer."""
    from crystalc.format.crystal import write_crystal

    if corpus is None and keep is None:
        raise CrystalError("give --corpus FILE, --keep IDS, or both")
    _check_output(out_path, model=model, corpus=corpus)
    graph = _apply_passes(_load(model, n_heads), corpus, keep, None, None)
    write_crystal(graph, out_path)
    skipped = graph.meta.get("prune_vocab", {}).get("skipped_chars", 0)
    plural = "" if skipped == 1 else "s"
    note = f" ({skipped:,} corpus character{plural} not in the vocabulary skipped)" if skipped else ""
    removed = graph.meta.get("prune_vocab", {}).get("removed_tokens", 0)
    if removed:
        note += f" ({removed:,} distinct corpus token{'' if removed == 1 else 's'} already pruned away, not restored)"
    of = graph.original_vocab_size
    click.echo(f"kept {graph.config.vocab_size} of {of} tokens{note}; wrote {out_path}")


@cli.command()
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="UTF-8 training corpus.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Checkpoint (.pt) to write.")
@click.option("--tokenizer", default="char", show_default=True, help="char, or bpe:N (byte-level BPE, N tokens).")
@click.option("--d-model", type=click.IntRange(1), default=128, show_default=True,
              help="Embedding width D (a multiple of --n-heads).")
@click.option("--n-ctx", type=click.IntRange(1), default=64, show_default=True, help="Context length T.")
@click.option("--n-heads", type=click.IntRange(1), default=4, show_default=True, help="Attention heads.")
@click.option("--n-blocks", type=click.IntRange(1), default=1, show_default=True,
              help="Blocks, each attention + neuron field + FFN.")
@click.option("--ffn-hidden", type=click.IntRange(1), default=None, help="FFN width (default 2 x d-model).")
@click.option("--tie-head", is_flag=True, help="The head reads the token embedding (no head.weight of its own).")
@click.option("--final-norm", is_flag=True, help="A LayerNorm (ln_f) between the last block and the head.")
@click.option("--neurons", type=click.IntRange(0), default=64, show_default=True, help="Initial neurons per block.")
@click.option("--max-neurons", type=click.IntRange(0), default=1024, show_default=True, help="Cap per block.")
@click.option("--growth", type=click.Choice(["split", "none"]), default="split", show_default=True,
              help="split: split the hottest non-frozen neurons; none: fixed size.")
@click.option("--grow-every", type=click.IntRange(1), default=10, show_default=True,
              help="Rounds between growths, and between freezing passes.")
@click.option("--grow-count", type=click.IntRange(0), default=0, show_default=True,
              help="Splits per growth; 0: reach --max-neurons by 80% of training (growth happens every "
                   "--grow-every rounds before then: none when that is past 80% of --rounds).")
@click.option("--freeze", type=click.Choice(["graceful", "none"]), default="graceful", show_default=True,
              help="graceful: from 20% of training on, freeze cold, quiet, old neurons; none: never.")
@click.option("--freeze-min-age", type=click.IntRange(0, (1 << 31) - 1), default=50, show_default=True,
              help="Rounds a neuron lives before it may freeze.")
@click.option("--soft-halflife", type=FiniteRange(0), default=0.0, show_default=True,
              help="Soft freezing: LR x max(0.01, 0.5^(age/halflife)) in rounds; 0 is off.")
@click.option("--steps", type=click.IntRange(1, MAX_STEPS), default=6000, show_default=True, help="Optimizer steps.")
@click.option("--rounds", type=click.IntRange(1), default=600, show_default=True,
              help="Rounds the run is divided into (the seeds' epochs); schedules count in rounds.")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Windows per step.")
@click.option("--lr", type=FiniteRange(0, 1e30, min_open=True), default=3e-3, show_default=True,
              help="Adam learning rate.")
@click.option("--warmup", type=click.IntRange(0), default=None,
              help="Steps of linear warm-up to --lr before the cosine decay (default: 100, or a tenth of --steps "
                   "when that is fewer).")
@click.option("--eval-every", type=click.IntRange(1), default=20, show_default=True, help="Rounds between evals.")
@click.option("--patience", type=click.IntRange(0), default=0, show_default=True,
              help="Stop after this many evaluations without a better validation loss and keep the best; 0: never.")
@click.option("--val-frac", type=FiniteRange(0, 1, max_open=True), default=0.1, show_default=True,
              help="Tail of the corpus held out for validation; 0: none.")
@click.option("--sampling", type=click.Choice(["auto", "overlap", "random"]), default="auto", show_default=True,
              help="overlap: windows with stride T/2; random: random starts; auto picks by corpus size.")
@click.option("--seed", type=click.IntRange(0, (1 << 32) - 1), default=0, show_default=True,
              help="Seed of the initialisation and the batch order, 0 to 2^32-1 (torch's CPU generator keeps "
                   "32 bits: a wider seed would train the same model as its low 32 bits).")
@click.option("--threads", type=click.IntRange(0, 1024), default=0, show_default=True,
              help="torch threads; 0: default.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda: train on the GPU (under torchrun, one GPU per rank with NCCL).")
@click.option("--quiet", is_flag=True, help="No progress bar: a line per evaluation on stderr instead (for logs).")
def train(data: str, out_path: str, tokenizer: str, d_model: int, n_ctx: int, n_heads: int, n_blocks: int,
          ffn_hidden: int | None, tie_head: bool, final_norm: bool, neurons: int, max_neurons: int, growth: str,
          grow_every: int, grow_count: int, freeze: str, freeze_min_age: int, soft_halflife: float, steps: int,
          rounds: int, batch_size: int, lr: float, warmup: int | None, eval_every: int, patience: int,
          val_frac: float, sampling: str, seed: int, threads: int, device: str, quiet: bool) -> None:
    """Train a crystal model on a text corpus (runs under torchrun too) and write a .pt checkpoint."""
    from crystalc.train.data import parse_tokenizer_spec, read_corpus
    from crystalc.train.loop import TrainConfig
    from crystalc.train.loop import train as run_training

    parse_tokenizer_spec(tokenizer)  # a bad spec fails before the corpus is read
    # options that would do nothing, as compile's --granularity without a mode: a typo's, or a wrong belief
    ctx = click.get_current_context()
    for option, name, off, because in (("--grow-count", "grow_count", growth == "none", "--growth none"),
                                       ("--max-neurons", "max_neurons", growth == "none", "--growth none"),
                                       ("--freeze-min-age", "freeze_min_age", freeze == "none", "--freeze none"),
                                       ("--grow-every", "grow_every", growth == freeze == "none",
                                        "--growth none and --freeze none")):
        if off and ctx.get_parameter_source(name) != ParameterSource.DEFAULT:
            raise CrystalError(f"{option} has no effect with {because}")
    _check_output(out_path, corpus=data)
    cfg = TrainConfig(
        d_model=d_model, n_ctx=n_ctx, n_heads=n_heads, n_blocks=n_blocks, ffn_hidden=ffn_hidden, tie_head=tie_head,
        final_norm=final_norm, neurons=neurons, max_neurons=max_neurons, growth=growth, grow_every=grow_every,
        grow_count=grow_count, freeze=freeze, freeze_every=grow_every, freeze_min_age=freeze_min_age,
        soft_halflife=soft_halflife, steps=steps, rounds=rounds, batch_size=batch_size, lr=lr, warmup=warmup,
        eval_every=eval_every, patience=patience, val_frac=val_frac, sampling=sampling, tokenizer=tokenizer,
        seed=seed, threads=threads, device=device, progress=not quiet)
    cfg.validate()  # before the corpus is read (up to 1 GiB)
    try:
        _, _, meta = run_training(read_corpus(data), cfg, out=out_path, log=lambda s: click.echo(s, err=True))
    except (MemoryError, RuntimeError) as e:
        # torch reports a failed allocation as a RuntimeError (a CPU allocator's) or its OutOfMemoryError subclass
        said = str(e)
        if not (isinstance(e, MemoryError) or "can't allocate memory" in said or "out of memory" in said):
            raise
        raise CrystalError(f"training ran out of memory (--batch-size {batch_size} x --n-ctx {n_ctx}, "
                           f"--d-model {d_model}): nothing written; lower --batch-size") from None
    # what the file holds: after early stopping, the best evaluation's weights, not the last one's
    best = [p for p in meta["curve"] if p["step"] == meta["best_step"]] if cfg.patience else meta["curve"][-1:]
    point = best[0] if best else None
    val = "" if point is None or point["val_loss"] != point["val_loss"] else f" val loss {point['val_loss']:.4f},"
    summary = (f":{val} {sum(point['neurons'])} neuron{'' if sum(point['neurons']) == 1 else 's'}, "
               f"{point['frozen_pct']:.1f}% frozen" + (f" (step {point['step']}, the best)" if cfg.patience else "")
               if point else "")
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 writes the file, so only it says so
        click.echo(f"wrote {out_path}{summary}")


@cli.command("eval")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--corpus", type=click.Path(dir_okay=False), required=True, help="Held-out text to score.")
@click.option("--modes", default="int8,int16,mixed,mixed8", show_default=True,
              help="Comma-separated quantization modes (float32 is always the baseline).")
@click.option("--granularities", default="tensor,row,group:32", show_default=True,
              help="Comma-separated granularities: tensor, row, group:N.")
@click.option("--max-tokens", type=click.IntRange(1), default=8192, show_default=True,
              help="Score at most this many tokens of the corpus (for a pruned model, counted before the "
                   "tokens it lacks are left out).")
@click.option("--per-tensor", is_flag=True,
              help="Instead of whole models, quantize one tensor at a time (the rest float32) and rank the "
                   "tensors by how far each moves the predictions (KL divergence from float32); one table per "
                   "mode x granularity.")
@calibrate_option
@calibrate_tokens_option
@n_heads_option
def eval_(model: str, corpus: str, modes: str, granularities: str, max_tokens: int, per_tensor: bool,
          calibrate: str | None, calibrate_tokens: int | None, n_heads: int | None) -> None:
    """Quality report: size, perplexity and agreement with float32 for every mode x granularity."""
    from crystalc.evaluate import checked_options, evaluate, markdown, sensitivity, sensitivity_markdown, timed_progress

    mode_list = [m for m in modes.replace(" ", "").split(",") if m]
    gran_list = [g for g in granularities.replace(" ", "").split(",") if g]
    if not mode_list or not gran_list:  # an empty list would report float32 alone: a slip, not a request
        raise CrystalError("give at least one mode and one granularity (--modes, --granularities)")
    mode_list, gran_list = checked_options(mode_list, gran_list)  # before the model is read; each once
    if calibrate is not None and _same_file(calibrate, corpus):
        # calibrated codes fit their text: scored on it, they would look better than they are
        raise CrystalError(f"--calibrate {calibrate} is the --corpus it would be scored on: calibrate on other text")
    graph = _load(model, n_heads)
    text = _read_text(corpus)
    calibration = _calibration(graph, calibrate, calibrate_tokens)
    progress = timed_progress(lambda s: click.echo(s, err=True))
    if not per_tensor:
        report = evaluate(graph, text, calibration=calibration, modes=mode_list, granularities=gran_list,
                          max_tokens=max_tokens, progress=progress)
        click.echo(markdown(report), nl=False)
        return
    tables = [sensitivity_markdown(sensitivity(graph, text, m, g, max_tokens=max_tokens, progress=progress,
                                               calibration=calibration))
              for m in mode_list for g in gran_list]
    click.echo("\n".join(tables), nl=False)


def _interrupted() -> NoReturn:
    from crystalc.fsutil import completed

    # outputs are renamed into place only when whole: those done before the interrupt, or none
    done = f"after writing {', '.join(map(str, completed))}" if completed else \
        "nothing written (an existing output is unchanged)"
    click.echo(f"crystalc: interrupted: {done}", err=True)
    sys.exit(130)


class _Terminated(BaseException):
    """SIGINT, or SIGTERM (timeout, docker, systemd): cleans up as an interrupt does, past click, which would
    print an empty line after a ^C that no terminal echoed."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (one ignored from the start stays so)
        signal.signal(signal.SIGINT, _terminate)  # past click too, which prints an empty line on a ^C
    try:
        cli.main(standalone_mode=False, prog_name="crystalc")
    except click.exceptions.Abort:
        _interrupted()
    except click.exceptions.NoArgsIsHelpError as e:  # `crystalc` alone: the help, as it is meant to be read
        click.echo(e.ctx.get_help() if e.ctx is not None else e.format_message())
        sys.exit(2)
    except click.ClickException as e:  # click lists choices on lines of their own: one line here
        click.echo(f"crystalc: error: {one_line(' '.join(e.format_message().split()))}", err=True)
        sys.exit(2)
    except CrystalError as e:
        click.echo(f"crystalc: error: {e}", err=True)
        sys.exit(2)
    except (KeyboardInterrupt, _Terminated):
        _interrupted()
    except MemoryError:
        click.echo("crystalc: error: out of memory (nothing written): a smaller model, corpus or batch", err=True)
        sys.exit(2)
    except OSError as e:  # what no command turned into a CrystalError: writing stdout (a full disk, /dev/full)
        click.echo(f"crystalc: error: {e.filename or 'writing the output'}: {e.strerror or e}", err=True)
        sys.exit(2)
    finally:
        # the outcome is settled (outputs whole, or the error said): a signal in the interpreter's last moments
        # would only turn it into a bare exit 130
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)


if __name__ == "__main__":
    main()
