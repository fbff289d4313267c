"""The training loop: Adam on the next-token loss, with growth and freezing between rounds.

Time is counted in steps (optimizer updates) and rounds. The seeds counted
epochs over their corpus (600 of them, growth every 10, freezing candidates at
least 50 epochs old, soft-freeze half-life 50); a short run cannot afford 600
passes over a corpus, so a run is divided into `rounds` rounds of equal length
(default 600, so the seeds' epoch numbers carry over as round numbers), and every
schedule is in rounds. A round of a 6,000-step run is 10 steps.

Under torchrun each rank takes its slice of every global batch, DDP averages
the gradients, and growth/freezing run identically on every rank from identical
statistics; the model is rewrapped (which re-broadcasts rank 0's state) after
every change of shape.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

import torch
import torch.nn.functional as F

from crystalc.config import ModelConfig
from crystalc.errors import CrystalError
from crystalc.model import Block, CrystalLM, save_checkpoint
from crystalc.tokenizer import Tokenizer
from crystalc.train import data as D
from crystalc.train.freezing import choose_frozen, soft_multiplier
from crystalc.train.growth import hottest, remap_optimizer, split
from crystalc.train.stats import FieldStats

MAX_LR = 1e30  # far past any rate that trains (0.1 diverges), and far below where Adam's step overflows float32
MAX_BATCH_TOKENS = 1 << 48


@dataclass
class TrainConfig:
    # model shape
    d_model: int = 128
    n_ctx: int = 64
    n_heads: int = 4
    n_blocks: int = 1
    ffn_hidden: int | None = None
    final_norm: bool = False
    tie_head: bool = False
    # neurons
    neurons: int = 64              # initial neurons per block
    max_neurons: int = 1024        # cap per block
    growth: str = "split"          # split | none
    grow_every: int = 10           # rounds
    grow_count: int = 0            # splits per growth event; 0: reach max_neurons by grow_until
    grow_until: float = 0.8        # fraction of training after which nothing grows
    grow_noise: float = 0.1
    halve_parent: bool = True
    # freezing
    freeze: str = "graceful"       # graceful | none
    freeze_every: int = 10         # rounds
    freeze_min_age: int = 50       # rounds
    soft_halflife: float = 0.0     # rounds; 0 turns soft freezing off
    # schedule
    steps: int = 6000
    rounds: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup: int | None = None      # steps; None: 100, or a tenth of the steps when that is fewer
    grad_clip: float = 1.0
    eval_every: int = 20           # rounds
    eval_windows: int = 64
    patience: int = 0              # evaluations without improvement before stopping; 0: never stop early
    val_frac: float = 0.1
    sampling: str = "auto"         # auto | overlap | random
    tokenizer: str = "char"
    seed: int = 0
    threads: int = 0               # 0: torch's default
    device: str = "cpu"            # cpu | cuda (under torchrun: cuda:LOCAL_RANK, NCCL)
    progress: bool = True

    def validate(self) -> None:
        if self.growth not in ("split", "none"):
            raise CrystalError(f"growth {self.growth!r}: expected split or none")
        if self.freeze not in ("graceful", "none"):
            raise CrystalError(f"freeze {self.freeze!r}: expected graceful or none")
        if self.sampling not in ("auto", "overlap", "random"):
            raise CrystalError(f"sampling {self.sampling!r}: expected auto, overlap or random")
        if not 0 <= self.seed < 1 << 32:  # torch's CPU generator keeps 32 bits: wider seeds would alias
            raise CrystalError(f"seed {self.seed}: expected 0 to 2^32-1")
        if self.steps < 1 or self.rounds < 1 or self.batch_size < 1:
            raise CrystalError("steps, rounds and batch size must be at least 1")
        # bounds past which torch fails mid-run with a traceback, not a model: Adam's update overflows float32
        # from lr 3.4e37, a batch's tensors' sizes int64 from about 2^58 tokens, the freezing round's ages 2^63
        # (below these, a rate too high diverges and a batch too big runs out of memory: both said in one line)
        if not 0 < self.lr <= MAX_LR:
            raise CrystalError(f"learning rate {self.lr:g}: expected above 0 and at most {MAX_LR:g}")
        if self.batch_size * (self.n_ctx + 1) > MAX_BATCH_TOKENS:
            raise CrystalError(f"batch size {self.batch_size} x (context {self.n_ctx} + 1) tokens: past 2^48 a "
                               "batch, which no machine holds")
        if not 0 <= self.freeze_min_age < 1 << 31:
            raise CrystalError(f"freeze min age {self.freeze_min_age}: expected 0 to 2^31-1 rounds")
        if self.warmup is not None and not 0 <= self.warmup <= self.steps:
            raise CrystalError(f"warm-up of {self.warmup} steps: expected 0 to the run's {self.steps} steps")
        if not 0 <= self.neurons <= self.max_neurons:
            raise CrystalError(f"initial neurons {self.neurons} must be between 0 and max neurons {self.max_neurons}")
        if self.neurons == 0 and self.growth == "split" and self.max_neurons > 0:  # it never grew, and said nothing
            raise CrystalError("growth splits neurons, and 0 initial neurons leave none to split: give --neurons 1 "
                               "or more, or --growth none for a model without a field")
        if not 0 <= self.val_frac < 1:
            raise CrystalError(f"validation fraction {self.val_frac} must be in [0, 1)")
        if self.patience and self.val_frac == 0:  # every evaluation would be NaN, never better: it stopped at once
            raise CrystalError("--patience watches the validation loss: it needs --val-frac above 0")
        D.parse_tokenizer_spec(self.tokenizer)
        # the model's shape, checked now with any vocabulary and the field at its cap: a d_model that
        # n_heads does not divide is said before the corpus is read (and a BPE trained on it), a cap past
        # the format's limit before the run that grows to it
        ModelConfig.from_dict(dict(
            vocab_size=256, d_model=self.d_model, n_ctx=self.n_ctx, n_heads=self.n_heads, n_blocks=self.n_blocks,
            n_neurons=self.max_neurons if self.growth == "split" else self.neurons,
            ffn_hidden=self.ffn_hidden or 2 * self.d_model, final_norm=self.final_norm, tie_head=self.tie_head))
        if self.device not in ("cpu", "cuda"):
            raise CrystalError(f"device {self.device!r}: expected cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise CrystalError("device cuda: torch sees no CUDA device")


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    on: bool = False
    device: torch.device = torch.device("cpu")


def _init_distributed(device: str) -> _Dist:
    """gloo on CPU, NCCL with one GPU per rank (cuda:LOCAL_RANK)."""
    if device == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _Dist(device=dev)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), True, dev)


def _wrap(model: CrystalLM, dd: _Dist) -> torch.nn.Module:
    if not dd.on:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # Construction broadcasts rank 0's parameters and buffers (the frozen bits too); the buffers are not synced
    # again before each forward (every rank changes them alike; broadcast_buffers=False, torch's old name for
    # that, skipped the first sync too and warns now). A field of no neurons adds nothing to the output, so its
    # (empty) parameters get no gradient, which DDP must be told of.
    ids = [dd.device.index] if dd.device.type == "cuda" else None
    unused = any(f.n_neurons == 0 for f in model.fields)
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False, find_unused_parameters=unused)


@dataclass
class _Run:
    cfg: TrainConfig
    curve: list[dict[str, Any]] = field(default_factory=list)
    best_val: float = math.inf
    best_state: dict[str, torch.Tensor] | None = None
    best_step: int = 0
    stopped_early: bool = False


def _lr_at(cfg: TrainConfig, step: int) -> float:
    assert cfg.warmup is not None  # train() sets it
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _round_of(cfg: TrainConfig, step: int) -> int:
    """Round that step `step` (0-based) belongs to."""
    return step * cfg.rounds // cfg.steps


@torch.no_grad()
def evaluate(model: CrystalLM, windows: torch.Tensor, batch: int = 32) -> float:
    if len(windows) == 0:
        return math.nan
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        logits = model(w[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum").item()
        n += w[:, 1:].numel()
    model.train(was)
    return total / n


@torch.no_grad()
def activity(model: CrystalLM, probe: torch.Tensor) -> list[torch.Tensor]:
    """Per block, each neuron's mean field weight over a fixed probe batch."""
    from crystalc.model import _field_forward

    hs: list[torch.Tensor] = []
    hooks = [cast(Block, blk).ln2.register_forward_hook(lambda _m, _i, out: hs.append(out)) for blk in model.blocks]
    was = model.training
    model.eval()
    model(probe)
    model.train(was)
    for hk in hooks:
        hk.remove()
    out = []
    for f, h in zip(model.fields, hs, strict=True):
        if f.n_neurons == 0:
            out.append(torch.zeros(0))
            continue
        _, _, _, wn = _field_forward(h, f.positions, f.values, f.temperature, f.normalize, f.eps)
        out.append(wn.reshape(-1, f.n_neurons).mean(0).cpu())
    return out


def _grow_count(cfg: TrainConfig) -> int:
    if cfg.grow_count > 0:
        return cfg.grow_count
    events = max(1, int(cfg.rounds * cfg.grow_until) // cfg.grow_every)
    return max(1, math.ceil((cfg.max_neurons - cfg.neurons) / events))


def train(text: str, cfg: TrainConfig, out: str | None = None,
          log: Callable[[str], None] | None = None) -> tuple[CrystalLM, dict[str, Any], dict[str, Any]]:
    """Train a crystal model on `text`; returns (model, tokenizer, meta) and writes `out` if given."""
    cfg.validate()
    if cfg.rounds > cfg.steps:
        # A round is at least one step; a shorter run has fewer rounds, and ages shrink with them.
        cfg = replace(cfg, rounds=cfg.steps)
    if cfg.warmup is None:  # a fixed 100 steps would keep a short run below its learning rate throughout
        cfg = replace(cfg, warmup=min(100, cfg.steps // 10))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dd = _init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    kind, asked = D.parse_tokenizer_spec(cfg.tokenizer)
    if kind == "bpe" and cfg.val_frac > 0:
        # A BPE's merges are fitted on the training text only: fitted on the held-out tail too, they would make
        # its tokens their own and its loss optimistic. So the text is split first, by characters (a char
        # tokenizer's split, below, is the same by tokens; it must see every character, and knowing them tells
        # it nothing of their order), and the byte-level BPE encodes the tail it never saw.
        cut = len(text) - int(len(text) * cfg.val_frac)
        tok = D.build_tokenizer(text[:cut], cfg.tokenizer)
        train_ids, val_ids = D.encode(text[:cut], tok), D.encode(text[cut:], tok)
        for part, n in (("training part", len(train_ids)), ("held-out tail", len(val_ids))):
            if n < cfg.n_ctx + 1:
                raise CrystalError(f"the corpus's {part} encodes to {n} tokens: too few for context {cfg.n_ctx} "
                                   f"with a {cfg.val_frac * 100:g}% validation split")
    else:
        tok = D.build_tokenizer(text, cfg.tokenizer)
        train_ids, val_ids = D.split(D.encode(text, tok), cfg.val_frac, cfg.n_ctx)
    vocab = Tokenizer(tok).vocab_size
    if kind == "bpe" and vocab < asked and log is not None and dd.rank == 0:  # said, not refused: still a model
        log(f"tokenizer {cfg.tokenizer}: the corpus gives {vocab} tokens (BPE runs out of pairs to merge)")
    mcfg = ModelConfig.from_dict(dict(
        vocab_size=vocab, d_model=cfg.d_model, n_ctx=cfg.n_ctx, n_heads=cfg.n_heads, n_blocks=cfg.n_blocks,
        n_neurons=cfg.neurons, ffn_hidden=cfg.ffn_hidden or 2 * cfg.d_model, final_norm=cfg.final_norm,
        tie_head=cfg.tie_head))
    model = CrystalLM(mcfg).to(dd.device)
    _fast_fields(model, True)
    batches = D.Batches(train_ids, cfg.n_ctx, cfg.batch_size, cfg.sampling, cfg.seed, dd.rank, dd.world)
    val_windows = D.eval_windows(val_ids, cfg.n_ctx, cfg.eval_windows).to(dd.device)
    train_windows = D.eval_windows(train_ids, cfg.n_ctx, 16).to(dd.device)
    probe = train_windows[:, :-1]
    grow_gen = torch.Generator().manual_seed(cfg.seed + 1)
    stats = [FieldStats.new(f.n_neurons) for f in model.fields]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    net = _wrap(model, dd)
    run = _Run(cfg)
    per_event = _grow_count(cfg)
    show = cfg.progress and dd.rank == 0
    bar = _progress(cfg.steps, show)
    last_loss = math.nan
    step = 0
    bad = 0  # evaluations since the best validation loss

    def diverged(what: str, loss: float) -> None:
        """A non-finite loss: the weights are lost with it. Early stopping keeps the best ones (the caller
        stops); without a best to keep, nothing is written."""
        if cfg.patience and run.best_state is not None:
            run.stopped_early = True
            return
        raise CrystalError(f"training diverged at step {step + 1} ({what} {loss}): nothing written; lower --lr")

    try:  # the bar is closed however the loop ends: an interrupt's message then stands on its own line
        for step in range(cfg.steps):
            r = _round_of(cfg, step)
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, step)
            x, y = batches.next()
            x, y = x.to(dd.device), y.to(dd.device)
            logits = net(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for f, st in zip(model.fields, stats, strict=True):
                st.observe(f.positions.grad)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            _step_with_freezing(opt, model, stats, r, cfg.soft_halflife)
            last_loss = loss.item()
            failed = not math.isfinite(last_loss)
            if dd.on:  # every rank stops together: one left alone would wait for the others' gradients forever
                import torch.distributed as dist

                t = torch.tensor([float(failed)], device=dd.device)
                dist.all_reduce(t)
                failed = bool(t.item())
            if failed:
                diverged(*(("loss", last_loss) if not math.isfinite(last_loss) else ("another rank's loss", math.nan)))
                break
            bar.update(1)
            if _round_of(cfg, step + 1) == r and step + 1 < cfg.steps:
                continue
            # --- end of round r: bookkeeping, growth, freezing, evaluation ---
            for st in stats:
                st.end_round()
            done = r + 1
            changed = False
            if cfg.freeze == "graceful" and done % cfg.freeze_every == 0:
                acts = activity(model, probe)
                for f, st, act in zip(model.fields, stats, acts, strict=True):
                    idx = choose_frozen(st, f.frozen, act, done / cfg.rounds, done, cfg.freeze_min_age)
                    if len(idx):
                        f.frozen[idx.to(f.frozen.device)] = True
            if cfg.growth == "split" and done % cfg.grow_every == 0 and done < cfg.rounds * cfg.grow_until + 1e-9:
                for f, st in zip(model.fields, stats, strict=True):
                    k = min(per_event, cfg.max_neurons - f.n_neurons)
                    parents = hottest(st, f.frozen, k)
                    if len(parents):
                        swaps = split(f, parents, grow_gen, cfg.grow_noise, cfg.halve_parent)
                        remap_optimizer(opt, swaps, parents)
                        st.append_children(parents, done)
                        changed = True
            if changed:
                model.config = _with_neurons(model.config, model)
                net = _wrap(model, dd)
            if done % cfg.eval_every == 0 or step + 1 == cfg.steps:
                if dd.on:  # the curve records the loss of the global batch, the same on every rank
                    import torch.distributed as dist

                    t = torch.tensor([last_loss], dtype=torch.float64, device=dd.device)
                    dist.all_reduce(t)
                    last_loss = float(t.cpu()) / dd.world
                val = evaluate(model, val_windows)
                # a step's loss comes before its update, so an evaluation checks the updates since: the
                # validation loss, or without validation text the last update on training windows
                if len(val_windows):
                    after, what = val, "validation loss"
                else:
                    last = step + 1 == cfg.steps
                    after, what = (evaluate(model, train_windows) if last else 0.0), "loss after the last update"
                if not math.isfinite(after):
                    diverged(what, after)
                    break
                point = _curve_point(step + 1, done, last_loss, val, model)
                run.curve.append(point)
                bar.set_postfix_str(f"loss {last_loss:.3f} val {val:.3f} neurons {sum(point['neurons'])} "
                                    f"frozen {point['frozen_pct']:.0f}%", refresh=False)
                if log is not None and not show and dd.rank == 0:
                    log(_fmt_point(point))
                if val < run.best_val - 1e-4 or math.isnan(run.best_val):
                    run.best_val, run.best_step = val, step + 1
                    run.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    bad = 0
                else:
                    bad += 1
                    if cfg.patience and bad >= cfg.patience:
                        run.stopped_early = True
                        break
    finally:
        bar.close()
    if run.best_state is not None and cfg.patience:
        model = _model_from_state(model.config, run.best_state).to(dd.device)
    _fast_fields(model, False)
    meta = _meta(text, cfg, run, model, step + 1, dd)
    if out is not None and dd.rank == 0:
        save_checkpoint(out, model, tok, meta)
    if dd.on:
        import torch.distributed as dist

        dist.barrier()
    return model, tok, meta


def _step_with_freezing(opt: torch.optim.Optimizer, model: CrystalLM, stats: list[FieldStats], round_: int,
                        halflife: float) -> None:
    """Adam step; then frozen neurons are put back bit for bit and soft freezing scales the rest's update.

    Adam's momentum would move a row whose gradient is zero, so a frozen row is
    restored from its copy; soft freezing multiplies the update itself (scaling an
    Adam gradient would change nothing).
    """
    work = [(f, st) for f, st in zip(model.fields, stats, strict=True)
            if f.n_neurons and (halflife > 0 or bool(f.frozen.any()))]
    olds = [[p.detach().clone() for p in (f.positions, f.values, f.temperature)] for f, _ in work]
    opt.step()
    with torch.no_grad():
        for (f, st), old in zip(work, olds, strict=True):
            mult = soft_multiplier(st, round_, halflife).to(f.positions) if halflife > 0 else None
            for p, o in zip((f.positions, f.values, f.temperature), old, strict=True):
                if mult is not None:
                    m = mult.view(-1, *([1] * (p.dim() - 1)))
                    p.copy_(o + m * (p - o))
                if bool(f.frozen.any()):
                    fm = f.frozen.view(-1, *([1] * (p.dim() - 1)))
                    p.copy_(torch.where(fm, o, p))


def _fast_fields(model: CrystalLM, on: bool) -> None:
    for f in model.fields:
        f.fast_distance = on


def _with_neurons(cfg: ModelConfig, model: CrystalLM) -> ModelConfig:
    d = cfg.to_dict()
    d["n_neurons"] = [f.n_neurons for f in model.fields]
    return ModelConfig.from_dict(d)


def _model_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> CrystalLM:
    d = cfg.to_dict()
    d["n_neurons"] = [state[f"blocks.{b}.field.positions"].shape[0] for b in range(cfg.n_blocks)]
    m = CrystalLM(ModelConfig.from_dict(d))
    m.load_state_dict(state, strict=True)
    return m


def _curve_point(step: int, round_: int, loss: float, val: float, model: CrystalLM) -> dict[str, Any]:
    n = [f.n_neurons for f in model.fields]
    fz = [int(f.frozen.sum()) for f in model.fields]
    return {"step": step, "round": round_, "loss": round(loss, 5), "val_loss": round(val, 5), "neurons": n,
            "frozen": fz, "frozen_pct": round(100.0 * sum(fz) / max(1, sum(n)), 2)}


def _fmt_point(p: dict[str, Any]) -> str:
    return (f"step {p['step']} round {p['round']}: loss {p['loss']:.4f} val {p['val_loss']:.4f} "
            f"neurons {sum(p['neurons'])} frozen {p['frozen_pct']:.1f}%")


def _meta(text: str, cfg: TrainConfig, run: _Run, model: CrystalLM, steps_done: int, dd: _Dist) -> dict[str, Any]:
    c = asdict(cfg)
    c.pop("progress")
    c.pop("threads")
    c.pop("device")
    return {
        "trained_by": "crystalc train",
        "corpus_sha256": D.corpus_digest(text),
        "corpus_chars": len(text),
        "train": c,
        "world_size": dd.world,
        "steps_done": steps_done,
        "stopped_early": run.stopped_early,
        "best_val_loss": None if math.isinf(run.best_val) else round(run.best_val, 5),
        "best_step": run.best_step,
        "neurons": [f.n_neurons for f in model.fields],
        "frozen": [int(f.frozen.sum()) for f in model.fields],
        "curve": run.curve,
    }


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, show: bool) -> Any:
    if not show:
        return _NoBar()
    from tqdm import tqdm

    # A terminal gets a live bar; a log file gets a line every 30 s instead of a flood.
    tty = sys.stderr.isatty()
    return tqdm(total=total, unit="step", dynamic_ncols=True, mininterval=0.2 if tty else 30.0, file=sys.stderr)
