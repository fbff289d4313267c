"""The front end: every checkpoint kind lowers to the same graph; bad input is one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from crystalc.errors import CrystalError
from crystalc.frontend import load_model
from crystalc.ir.interpret import forward
from tests.conftest import SPEC_VECTORS, random_graph, require_module, save_pt


def _same(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k])
    assert a.config == b.config


def test_wrapper_roundtrip(tmp_path: Path) -> None:
    g = random_graph("three_blocks_n0_n1", seed=2)
    _same(g, load_model(save_pt(g, tmp_path / "m.pt")))


def test_legacy_pickle_format_loads(tmp_path: Path) -> None:
    """torch.save's pre-1.6 format is a pickle stream, not a zip archive: the front end still takes it."""
    g = random_graph("d40_h5", seed=2)
    p = tmp_path / "legacy.pt"
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in g.state_dict().items()}, p,
               _use_new_zipfile_serialization=False)
    _same(g, load_model(p, n_heads=5))


def test_bare_state_dict_needs_heads(tmp_path: Path) -> None:
    g = random_graph("d40_h5", seed=2)
    p = tmp_path / "bare.pt"
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in g.state_dict().items()}, p)
    with pytest.raises(CrystalError, match="n-heads"):
        load_model(p)
    _same(g, load_model(p, n_heads=5))


def test_seeds_layout_matches_vectors() -> None:
    g = load_model(SPEC_VECTORS / "seeds_layout.pt")
    assert g.config.n_heads == 4 and g.config.n_blocks == 1
    assert g.tokenizer is None and g.meta == {}


@pytest.mark.parametrize("ctx_key", ["context_len", "context_length"])
def test_config_in_the_seeds_spelling(tmp_path: Path, ctx_key: str) -> None:
    """A config spelled as the seeds spelled it (num_heads, embed_dim, context_len, num_neurons, hidden_dim)
    configures a checkpoint of canonical names; a seeds-layout file takes its shapes from the weights
    (the spec), and only num_heads from its config."""
    g = random_graph("d40_h5", seed=4)
    config = {"vocab_size": 23, "num_heads": 5, "embed_dim": 40, ctx_key: 9, "num_neurons": [7], "hidden_dim": 80}
    p = tmp_path / "m.pt"
    torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in g.state_dict().items()}, "config": config}, p)
    _same(g, load_model(p))
    config["hidden_dim"] = 81  # the config is what the weights are checked against
    torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in g.state_dict().items()}, "config": config}, p)
    with pytest.raises(CrystalError, match="fc1"):
        load_model(p)


def test_seeds_layout_older_names_and_no_frozen(tmp_path: Path) -> None:
    """Older seeds' files call the field `attention.*` and predate the frozen buffer."""
    sd = torch.load(SPEC_VECTORS / "seeds_layout.pt", weights_only=True)["model"]
    old = {k.replace("geo_attn.", "attention."): v for k, v in sd.items() if k != "geo_attn.frozen"}
    p = tmp_path / "old.pt"
    torch.save(old, p)
    g = load_model(p)
    assert not g.blocks[0].field.frozen.data.any()
    ref = load_model(SPEC_VECTORS / "seeds_layout.pt")
    np.testing.assert_array_equal(forward(g, [1, 2, 3]), forward(ref, [1, 2, 3]))


def test_safetensors_with_json_config(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    g = random_graph("tied_unnormalised", seed=5)
    sd = {k: np.ascontiguousarray(v) for k, v in g.state_dict().items()}
    sd = {k: (v.astype(np.uint8) if v.dtype == bool else v) for k, v in sd.items()}
    save_file(sd, str(tmp_path / "m.safetensors"))
    (tmp_path / "m.json").write_text(json.dumps(g.config.to_dict()))
    _same(g, load_model(tmp_path / "m.safetensors"))


def _safetensors(tmp_path: Path, doc: object | None) -> Path:
    """A d40_h5 model as m.safetensors, with `doc` (if any) as m.json beside it."""
    from safetensors.numpy import save_file

    g = random_graph("d40_h5", seed=5)
    sd = {k: np.ascontiguousarray(v.astype(np.uint8) if v.dtype == bool else v) for k, v in g.state_dict().items()}
    save_file(sd, str(tmp_path / "m.safetensors"))
    if doc is not None:
        (tmp_path / "m.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return tmp_path / "m.safetensors"


def test_safetensors_with_a_wrapped_config_tokenizer_and_meta(tmp_path: Path) -> None:
    from crystalc.tokenizer import char_tokenizer

    g = random_graph("d40_h5", seed=5)
    tok = char_tokenizer("abcdefghijklmnopqrstuvw")
    p = _safetensors(tmp_path, {"config": g.config.to_dict(), "tokenizer": tok, "meta": {"note": "x"}})
    loaded = load_model(p)
    _same(g, loaded)
    assert loaded.tokenizer == tok and loaded.meta["note"] == "x"


@pytest.mark.parametrize(("doc", "needle"), [
    (None, "n_heads cannot be inferred"),  # no config: inferred from the shapes but the heads
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ("[" * 100000 + "]" * 100000, "not valid JSON"),  # nested past the decoder's recursion limit
    ({"config": {}, "meta": [1]}, "'meta' should be an object, not list"),
])
def test_safetensors_config_errors(tmp_path: Path, doc: object | None, needle: str) -> None:
    with pytest.raises(CrystalError, match=needle):
        load_model(_safetensors(tmp_path, doc))


def test_a_wrong_config_beside_safetensors_is_named(tmp_path: Path) -> None:
    # an unrelated config.json in the folder is the likely culprit: the error says which file it read
    p = _safetensors(tmp_path, None)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2"], "n_embd": 768}))
    with pytest.raises(CrystalError, match=r"m.safetensors \(config from .*config.json\): .*unknown field"):
        load_model(p)


def test_safetensors_float16_and_float64_are_read_as_float32(tmp_path: Path) -> None:
    # as .pt files' are: the values are rounded to float32 (f16 -> f32 exactly)
    from safetensors.numpy import save_file

    g = random_graph("d40_h5", seed=5)
    sd = {k: np.ascontiguousarray(v.astype(np.uint8) if v.dtype == bool else v.astype(np.float16))
          for k, v in g.state_dict().items()}
    save_file(sd, str(tmp_path / "m.safetensors"))
    (tmp_path / "m.json").write_text(json.dumps(g.config.to_dict()))
    loaded = load_model(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(loaded.head.bias.data, g.head.bias.data.astype(np.float16).astype(np.float32))


def test_safetensors_is_known_by_its_bytes_not_its_name(tmp_path: Path) -> None:
    g = random_graph("d40_h5", seed=5)
    p = _safetensors(tmp_path, g.config.to_dict())
    _same(g, load_model(p.rename(tmp_path / "m.weights")))  # its config is still m.json beside it


def test_truncated_safetensors(tmp_path: Path) -> None:
    g = random_graph("d40_h5", seed=5)
    p = _safetensors(tmp_path, g.config.to_dict())
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(CrystalError, match="not a readable safetensors file"):
        load_model(p)


# --- bad input: one line, exit status 2, nothing written ------------------------------------

def _ckpt(tmp_path: Path, mutate) -> Path:
    g = random_graph("d40_h5", seed=7)
    ckpt = {"format": "crystalc-checkpoint", "version": 1, "config": g.config.to_dict(),
            "model": {k: torch.from_numpy(np.array(v)) for k, v in g.state_dict().items()}, "meta": {}}
    mutate(ckpt)
    p = tmp_path / "bad.pt"
    torch.save(ckpt, p)
    return p


def _drop(key: str):
    return lambda c: c["model"].pop(key)


def _reshape(key: str):
    return lambda c: c["model"].__setitem__(key, torch.zeros(3, 3))


def _nan(key: str):
    def f(c):
        c["model"][key][0] = float("nan")
    return f


def _inf(key: str):
    def f(c):
        c["model"][key].view(-1)[-1] = float("inf")
    return f


def _config(key: str, value):
    return lambda c: c["config"].__setitem__(key, value)


BAD = {
    "missing key": (_drop("blocks.0.ffn.fc1.bias"), "missing parameter blocks.0.ffn.fc1.bias"),
    "wrong shape": (_reshape("blocks.0.field.positions"), r"blocks.0.field.positions: shape \[3, 3\]"),
    "nan": (_nan("head.bias"), "head.bias: 1 NaN/Inf"),
    "inf": (_inf("blocks.0.attn.q_proj.weight"), "q_proj.weight: 1 NaN/Inf"),
    "heads do not divide": (lambda c: c["config"].__setitem__("n_heads", 3), "not divisible by n_heads"),
    "absurd dimension": (lambda c: c["config"].__setitem__("vocab_size", 1 << 40), "vocab_size"),
    "unknown config field": (lambda c: c["config"].__setitem__("n_layers", 2), "unknown field"),
    "unexpected key": (lambda c: c["model"].__setitem__("blocks.0.extra.weight", torch.zeros(2)),
                       "unexpected parameter blocks.0.extra.weight"),
    "wrong version": (lambda c: c.__setitem__("version", 9), "version 9"),
    "not a tensor": (lambda c: c["model"].__setitem__("head.bias", [1.0]), "head.bias is a list"),
    # Found by mutating checkpoints' configs: each was a TypeError, ValueError or OverflowError traceback.
    "config integer is a list": (_config("n_heads", [5]), r"n_heads must be an integer, got \[5\]"),
    "config integer is NaN": (_config("d_model", float("nan")), "d_model must be an integer, got nan"),
    "config integer is infinite": (_config("n_ctx", float("inf")), "n_ctx must be an integer, got inf"),
    "config integer is text": (_config("vocab_size", "23"), "vocab_size must be an integer, got '23'"),
    "config integer is a bool": (_config("n_blocks", True), "n_blocks must be an integer, got True"),
    "neuron count is text": (_config("n_neurons", ["7"]), "n_neurons entry must be an integer"),
    "flag is not a bool": (_config("field_norm", "yes"), "field_norm must be true or false"),
    "meta is not a dict": (lambda c: c.__setitem__("meta", 5), "'meta' should be a dict, not int"),
    "tokenizer is not a record": (lambda c: c.__setitem__("tokenizer", 5), "tokenizer: expected a record"),
    "tokenizer of another size": (lambda c: c.__setitem__("tokenizer", {"kind": "char", "chars": "ab"}),
                                  "2 characters for a vocabulary of 23 ids"),
    "tokenizer repeats a character": (lambda c: c.__setitem__("tokenizer", {"kind": "char", "chars": "a" * 23}),
                                      "repeats a character"),
    "tokenizer of unknown kind": (lambda c: c.__setitem__("tokenizer", {"kind": "sentencepiece"}), "unknown kind"),
    # Found by an audit of the command line: tracebacks from numpy, or a mask read as True from NaN
    "sparse tensor": (lambda c: c["model"].__setitem__("head.bias", c["model"]["head.bias"].to_sparse()),
                      "head.bias is a torch.sparse_coo"),
    "quantized tensor": (lambda c: c["model"].__setitem__(
        "head.bias", torch.quantize_per_tensor(c["model"]["head.bias"], 0.1, 0, torch.qint8)),
        "head.bias is a quantized tensor"),
    "frozen mask of floats": (lambda c: c["model"].__setitem__("blocks.0.field.frozen", torch.full((7,), 0.5)),
                              "a frozen mask must be bool or 0/1"),
    "float64 past float32": (lambda c: c["model"].__setitem__("head.bias", torch.full((23,), 1e300,
                                                                                       dtype=torch.float64)),
                             "head.bias: 23 NaN/Inf"),
    # Found by an audit of the front end: True == 1 was version 1; a tensor meta had no truth value (traceback)
    "version is a bool": (lambda c: c.__setitem__("version", True), "version True, not an integer"),
    "version is a tensor": (lambda c: c.__setitem__("version", torch.ones(2)), "version a Tensor, not an integer"),
    "meta is a tensor": (lambda c: c.__setitem__("meta", torch.zeros(3)), "'meta' should be a dict, not Tensor"),
    "integer weights": (lambda c: c["model"].__setitem__("head.bias", torch.zeros(23, dtype=torch.int64)),
                        "head.bias: dtype int64, expected a floating-point tensor"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")  # making the quantized case: deprecated in torch
def test_bad_checkpoint_raises(tmp_path: Path, case: str) -> None:
    mutate, pattern = BAD[case]
    with pytest.raises(CrystalError, match=pattern):
        load_model(_ckpt(tmp_path, mutate))


def test_n_heads_must_agree_with_a_crystal_file(tmp_path: Path) -> None:
    from crystalc.format.crystal import write_crystal

    p = tmp_path / "m.crystal"
    write_crystal(random_graph("d40_h5", seed=7), p)
    assert load_model(p, n_heads=5).config.n_heads == 5
    with pytest.raises(CrystalError, match="--n-heads 4 disagrees with the file's n_heads 5"):
        load_model(p, n_heads=4)


def test_every_command_that_reads_a_model_takes_n_heads() -> None:
    # a bare state_dict cannot say its heads: a command reading MODEL without --n-heads could not read one
    from crystalc.cli import cli

    readers = [name for name, cmd in cli.commands.items() if any(p.name == "model" for p in cmd.params)]
    assert {"compile", "inspect", "quantize", "prune-vocab", "eval", "run"} <= set(readers)
    for name in readers:
        assert any(p.name == "n_heads" for p in cli.commands[name].params), name


def test_integral_floats_are_config_integers(tmp_path: Path) -> None:
    """JSON writers may spell 40 as 40.0; that is still 40."""
    g = load_model(_ckpt(tmp_path, _config("d_model", 40.0)))
    assert g.config.d_model == 40 and type(g.config.d_model) is int


def test_names_from_the_file_cannot_break_the_line(tmp_path: Path) -> None:
    with pytest.raises(CrystalError) as e:
        load_model(_ckpt(tmp_path, lambda c: c["model"].__setitem__("blocks.0.field\nvalues", torch.zeros(2))))
    assert "\n" not in str(e.value) and "blocks.0.field\\nvalues" in str(e.value)


def test_damaged_pickle_inside_a_zip_is_a_crystal_error(tmp_path: Path) -> None:
    """torch.load asserts (AssertionError) on a persistent id that is not a tuple; that is still bad input."""
    import io
    import pickle
    import zipfile

    class IntIds(pickle.Pickler):
        def persistent_id(self, obj):
            return 5 if isinstance(obj, bytes) else None

    buf = io.BytesIO()
    IntIds(buf, protocol=2).dump({"model": b"x"})
    p = tmp_path / "damaged.pt"
    with zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/version", "3\n")
    with pytest.raises(CrystalError, match="not a readable PyTorch checkpoint"):
        load_model(p)


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crystalc.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n", b"PK\x03\x04truncated zip"])
def test_cli_not_a_checkpoint(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "not-a-checkpoint.pt"
    p.write_bytes(content)
    r = _cli("inspect", str(p))
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "not-a-checkpoint.pt" in r.stderr
    assert "Traceback" not in r.stderr
    if not content.startswith(b"PK"):  # not even the start of a checkpoint: say what was expected
        assert "expected a .crystal file" in r.stderr, r.stderr


def test_cli_nan_checkpoint_one_line(tmp_path: Path) -> None:
    r = _cli("inspect", str(_ckpt(tmp_path, _nan("pos_embed.weight"))))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "pos_embed.weight" in r.stderr


def test_cli_unknown_option_one_line() -> None:
    r = _cli("inspect", "--bogus")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--bogus" in r.stderr


def test_cli_refuses_an_option_given_twice(tmp_path: Path) -> None:
    """click keeps the last of two values; a repeat is refused before any work, whichever command it is."""
    for args in (["quantize", "m.pt", "--int8", "-o", "a.crystal", "-o", "b.crystal"],
                 ["compile", "m.pt", "-t", "c", "--target", "cuda", "-o", "out"],
                 ["run", "m.pt", "--prompt", "A", "--prompt", "B"]):
        r = _cli(*args, cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "given twice" in r.stderr, (args, r.stderr)
    assert list(tmp_path.iterdir()) == []


def test_cli_usage_errors_read_as_one_line_or_as_help() -> None:
    r = _cli("compile", "m.pt", "-o", "out")  # click lists the choices on lines of their own
    assert r.returncode == 2 and r.stderr == ("crystalc: error: Missing option '--target' / '-t'. "
                                              "Choose from: c, verilog, spice, cuda\n"), r.stderr
    r = _cli()  # no command: the help itself, readable, not folded into one escaped line
    assert r.returncode == 2 and r.stdout.startswith("Usage: crystalc") and "\\n" not in r.stdout
    assert "  compile " in r.stdout, r.stdout


def test_cli_missing_file(tmp_path: Path) -> None:
    r = _cli("inspect", "/nonexistent/model.pt")
    assert r.returncode == 2 and "no such file" in r.stderr
    import os

    os.mkfifo(tmp_path / "fifo")  # exists, and is not a model's file (nor is a device)
    for special in (tmp_path / "fifo", Path("/dev/null")):  # (a folder: click says so)
        r = _cli("inspect", str(special))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a regular file" in r.stderr, r.stderr


def test_weights_only_refuses_pickled_code(tmp_path: Path) -> None:
    """A checkpoint that would run code on unpickling is refused, not executed."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    p = tmp_path / "evil.pt"
    torch.save({"model": {"x": Evil()}}, p)
    r = _cli("inspect", str(p))
    assert r.returncode == 2 and not marker.exists() and r.stderr.count("\n") == 1
    # named for what it is, without torch's advice to load it with weights_only off
    assert "refused: it holds pickled objects other than tensors" in r.stderr and "Re-running" not in r.stderr


def test_a_plain_pickle_is_said_to_be_one(tmp_path: Path) -> None:
    # an audit: pickle.dump({"x": 1}) was "refused: it holds pickled objects other than tensors", which it does not
    import os
    import pickle

    marker = tmp_path / "pwned"
    for name, obj in (("plain.pkl", {"x": 1}), ("evil.pkl", {"x": (os.system, (f"touch {marker}",))})):
        (tmp_path / name).write_bytes(pickle.dumps(obj, protocol=4))
        r = _cli("inspect", str(tmp_path / name))
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "not a PyTorch checkpoint: a plain pickle" in r.stderr and not marker.exists(), r.stderr


def test_inspect_reports_neurons() -> None:
    r = _cli("inspect", str(SPEC_VECTORS / "two_blocks.pt"))
    assert r.returncode == 0, r.stderr
    assert "neuron_field" in r.stdout and "6 neurons" in r.stdout and "3 neurons" in r.stdout
    assert "parameters:" in r.stdout


def _pt(tmp_path: Path, state: dict, config: dict | None = None, name: str = "m.pt") -> Path:
    p = tmp_path / name
    sd = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    torch.save(sd if config is None else {"model": sd, "config": config}, p)
    return p


def test_two_keys_for_one_parameter_are_refused(tmp_path: Path) -> None:
    # last-wins would pick one of two different tensors: the file is ambiguous, not the newer one right
    sd = torch.load(SPEC_VECTORS / "seeds_layout.pt", weights_only=True)["model"]
    both = {**{k: v.numpy() for k, v in sd.items()}, "attention.positions": sd["geo_attn.positions"].numpy() + 1}
    with pytest.raises(CrystalError, match="geo_attn.positions and attention.positions both give "
                                           "blocks.0.field.positions"):
        load_model(_pt(tmp_path, both))
    g = random_graph("d40_h5", seed=3)
    mixed = {**g.state_dict(), "causal_attn.q_proj.weight": np.zeros((40, 40), np.float32)}
    with pytest.raises(CrystalError, match=r"mixes the seeds' names \(causal_attn.q_proj.weight\) with crystalc's"):
        load_model(_pt(tmp_path, mixed, g.config.to_dict()))


@pytest.mark.parametrize("config,match", [
    ({"n_heads": 5, "tie_head": True}, "tie_head = True, but the tensors say False"),  # head.weight is there
    ({"n_heads": 5, "final_norm": True}, "final_norm = True, but the tensors say False"),
    ({"n_heads": 5, "d_model": 64}, "d_model = 64, but the tensors say 40"),
    ({"n_heads": 5, "n_neurons": 3}, r"n_neurons = \[3\], but the tensors say \[7\]"),
    ({"n_heads": 5, "dropout": 0.1}, "unknown field"),
    ({"n_heads": 0}, "n_heads = 0 is outside"),
    ({"n_heads": 5, "field_eps": True}, "field_eps must be a finite non-negative number within float32"),
    ({"n_heads": 5, "ln_eps": 1e300}, "ln_eps must be a finite non-negative number within float32"),  # inf there
    ({"n_heads": 5, 1: 2}, "key 1 is not a string"),
])
def test_a_partial_config_is_checked_against_the_tensors(tmp_path: Path, config: dict, match: str) -> None:
    g = random_graph("d40_h5", seed=3)
    with pytest.raises(CrystalError, match=match):
        load_model(_pt(tmp_path, g.state_dict(), config))
    _same(g, load_model(_pt(tmp_path, g.state_dict(), {"n_heads": 5, "d_model": 40, "n_neurons": 7})))


def test_n_heads_from_the_option_and_the_config_must_agree(tmp_path: Path) -> None:
    g = random_graph("d40_h5", seed=3)
    p = _pt(tmp_path, g.state_dict(), {"n_heads": 5})
    with pytest.raises(CrystalError, match="--n-heads 8 disagrees with the checkpoint's n_heads 5"):
        load_model(p, n_heads=8)
    _same(g, load_model(p, n_heads=5))


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
def test_narrow_float_safetensors_are_widened_both_ways(tmp_path: Path, dtype: str) -> None:
    from safetensors.torch import save_file

    g = random_graph("d40_h5", seed=5)
    narrow = getattr(torch, dtype)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in g.state_dict().items()}
    save_file({k: (v.to(narrow) if v.is_floating_point() else v.to(torch.uint8)) for k, v in sd.items()},
              str(tmp_path / "m.safetensors"))
    (tmp_path / "m.json").write_text(json.dumps(g.config.to_dict()))
    want = {k: v.to(narrow).to(torch.float32).numpy() for k, v in sd.items() if v.is_floating_point()}
    # numpy has no such type until ml_dtypes is imported (by onnx, say): then safetensors reads through numpy,
    # before it through torch. A process where ml_dtypes cannot be imported takes the torch path
    code = ("import sys; sys.modules['ml_dtypes'] = None; import numpy as np; "
            "from crystalc.frontend import load_model; "
            f"g = load_model({str(tmp_path / 'm.safetensors')!r}); "
            f"np.savez({str(tmp_path / 'torch.npz')!r}, **g.state_dict())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    through_torch = dict(np.load(tmp_path / "torch.npz"))
    require_module("ml_dtypes")  # imported now: load_model's read goes through numpy
    for got in (through_torch, load_model(tmp_path / "m.safetensors").state_dict()):
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v)


def test_meta_tensors_are_refused(tmp_path: Path) -> None:
    g = random_graph("d40_h5", seed=5)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in g.state_dict().items()}
    meta = {k: (torch.empty(v.shape, device="meta") if k == "head.bias" else v) for k, v in sd.items()}
    torch.save({"model": meta, "config": g.config.to_dict()}, tmp_path / "meta.pt")
    r = _cli("inspect", str(tmp_path / "meta.pt"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "head.bias is a meta tensor" in r.stderr


def test_a_checkpoint_named_safetensors_is_read_by_its_bytes(tmp_path: Path) -> None:
    g = random_graph("d40_h5", seed=2)
    _same(g, load_model(save_pt(g, tmp_path / "really-a-pt.safetensors")))


def test_a_tied_head_saved_under_both_names(tmp_path: Path) -> None:
    # torch saves a shared Parameter under each name it has: the same values are the tie, others a conflict
    g = random_graph("tied_unnormalised", seed=4)
    sd = {**g.state_dict(), "head.weight": g.state_dict()["token_embed.weight"]}
    _same(g, load_model(_pt(tmp_path, sd, g.config.to_dict())))
    sd["head.weight"] = sd["head.weight"] + 1
    with pytest.raises(CrystalError, match="head.weight differs from token_embed.weight, but the config ties"):
        load_model(_pt(tmp_path, sd, g.config.to_dict()))


def test_a_broken_tokenizer_json_is_said_of_its_file(tmp_path: Path) -> None:
    """Not only when a later command encodes a prompt, and never copied into an output."""
    from crystalc.format.crystal import write_crystal

    g = random_graph("d40_h5", seed=1, tokenizer={"kind": "hf-tokenizers", "json": "{not json"})
    crystal = tmp_path / "m.crystal"
    write_crystal(g, crystal)
    for path in (save_pt(g, tmp_path / "m.pt"), crystal):
        with pytest.raises(CrystalError, match=f"^{path}: tokenizer: bad tokenizer.json"):
            load_model(path)


def test_without_the_tokenizers_package_a_bpe_model_still_loads(tmp_path: Path, monkeypatch) -> None:
    """Only the commands that encode need the [bpe] extra; the rest carry the tokenizer, checked as JSON."""
    import importlib.util

    from crystalc.tokenizer import Tokenizer
    from crystalc.train.data import build_tokenizer

    tok = build_tokenizer("to be or not to be\n" * 10, "bpe:262")
    g = random_graph(dict(vocab_size=Tokenizer(tok).vocab_size, d_model=8, n_ctx=4, n_heads=2, n_neurons=2,
                          ffn_hidden=8), seed=1, tokenizer=tok)
    good, bad = save_pt(g, tmp_path / "good.pt"), save_pt(g.replace(tokenizer={**tok, "json": "{x"}), tmp_path / "b.pt")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed: finding or importing it fails
    assert importlib.util.find_spec("tokenizers") is None
    assert load_model(good).tokenizer == tok
    with pytest.raises(CrystalError, match=f"^{bad}: tokenizer: bad tokenizer.json"):
        load_model(bad)


# --- found by an audit of the front end: each was a traceback, a silently different model, or gigabytes ---------

def _pt_dtype(dtype_case: str) -> torch.Tensor:
    if dtype_case == "complex64 requiring grad":
        return torch.zeros(23, dtype=torch.complex64).requires_grad_()
    if dtype_case == "complex32":
        return torch.zeros(23).to(torch.complex32)
    return torch.empty(23, dtype=getattr(torch, dtype_case))


@pytest.mark.parametrize(("dtype_case", "shown"), [
    ("complex64 requiring grad", "complex64"), ("complex32", "complex32"), ("bits8", "bits8"),
    ("bits16", "bits16"), ("float4_e2m1fn_x2", "float4_e2m1fn_x2")])
@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_pt_dtypes_crystalc_does_not_read(tmp_path: Path, dtype_case: str, shown: str) -> None:
    p = _ckpt(tmp_path, lambda c: c["model"].__setitem__("head.bias", _pt_dtype(dtype_case)))
    with pytest.raises(CrystalError, match=f"bad.pt: head.bias: dtype {shown} is not one crystalc reads"):
        load_model(p)


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e5m2", "float16"])
def test_pt_narrow_floats_and_parameters_are_read(tmp_path: Path, dtype: str) -> None:
    # widened exactly, and a Parameter (requires_grad) saved as it is, not refused for its grad
    g = random_graph("d40_h5", seed=7)
    narrow = getattr(torch, dtype)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in g.state_dict().items()}
    sd = {k: (torch.nn.Parameter(v.to(narrow)) if v.is_floating_point() else v) for k, v in sd.items()}
    torch.save({"model": sd, "config": g.config.to_dict()}, tmp_path / "m.pt")
    got = load_model(tmp_path / "m.pt").state_dict()
    for k, v in sd.items():
        if v.is_floating_point():
            np.testing.assert_array_equal(got[k], v.detach().to(torch.float32).numpy())


def test_safetensors_float4_is_refused(tmp_path: Path) -> None:
    import struct

    g = random_graph("d40_h5", seed=5)
    header, data = {}, b""
    for k, v in g.state_dict().items():
        raw, dtype, shape = np.ascontiguousarray(v).tobytes(), "BOOL" if v.dtype == bool else "F32", list(v.shape)
        if k == "head.bias":
            raw, dtype, shape = b"\x01" * 12, "F4", [24]  # two values a byte
        header[k] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + data)
    (tmp_path / "m.json").write_text(json.dumps(g.config.to_dict()))
    with pytest.raises(CrystalError, match="m.safetensors: head.bias: dtype float4_e2m1fn_x2 is not one crystalc"):
        load_model(tmp_path / "m.safetensors")


@pytest.mark.parametrize(("config", "n_heads", "match"), [
    ({"n_heads": 5, "d_model": torch.tensor([40, 40])}, None, "config: d_model is a Tensor"),
    ({"n_heads": torch.tensor([5, 5])}, 5, "config: n_heads is a Tensor"),  # compared with --n-heads
    ({"num_heads": torch.tensor([5, 5])}, None, "config: num_heads is a Tensor"),
    ({"n_heads": 5, "n_neurons": [torch.tensor(7)]}, None, "config: n_neurons holds a Tensor"),
])
def test_config_values_of_other_types_are_refused(tmp_path: Path, config: dict, n_heads: int | None,
                                                  match: str) -> None:
    g = random_graph("d40_h5", seed=3)
    with pytest.raises(CrystalError, match=match):
        load_model(_pt(tmp_path, g.state_dict(), config), n_heads=n_heads)


def test_two_spellings_of_one_config_field(tmp_path: Path) -> None:
    # the later key won, silently: a model of 4 heads where the config said 5 too
    with pytest.raises(CrystalError, match="config: n_heads and num_heads both give n_heads"):
        load_model(_ckpt(tmp_path, _config("num_heads", 4)))
    with pytest.raises(CrystalError, match="config: context_len and n_ctx both give n_ctx"):
        load_model(_pt(tmp_path, random_graph("d40_h5", seed=3).state_dict(),
                       {"n_heads": 5, "context_len": 9, "n_ctx": 9.0}))
    assert load_model(_ckpt(tmp_path, _config("num_heads", 5))).config.n_heads == 5  # the same value: one thing


@pytest.mark.parametrize("key", ["blocks.0.field.temperature", "blocks.0.field.frozen"])
def test_a_scalar_is_not_a_tensor_of_one_element(tmp_path: Path, key: str) -> None:
    g = random_graph(dict(vocab_size=23, d_model=8, n_ctx=4, n_heads=2, n_neurons=1, ffn_hidden=8), seed=1)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in g.state_dict().items()}
    sd[key] = sd[key].reshape(())
    torch.save({"model": sd, "config": g.config.to_dict()}, tmp_path / "m.pt")
    with pytest.raises(CrystalError, match=rf"{key}: shape \[\], expected \[1\]"):
        load_model(tmp_path / "m.pt")


def test_a_tensor_larger_than_its_data_is_refused_before_it_is_copied(tmp_path: Path) -> None:
    # an expanded (stride 0) tensor: a 49 KB file once became 1.2 GB before any shape was checked
    p = _ckpt(tmp_path, lambda c: c["model"].__setitem__("head.bias", torch.zeros(1).expand(23)))
    with pytest.raises(CrystalError, match=r"bad.pt: head.bias: shape \[23\] is larger than the data it holds"):
        load_model(p)
    # many overlapping views of one storage multiply it the same way
    shared = torch.zeros(100)
    torch.save({f"k{i}": shared[i:] for i in range(3)}, tmp_path / "shared.pt")
    with pytest.raises(CrystalError, match="view 1188 bytes in 400 bytes of data: more than twice"):
        load_model(tmp_path / "shared.pt", n_heads=1)
    # and the tensors of a meta, which become lists of Python numbers: expanded, or more than a record
    for meta, says in (({"curve": [torch.zeros(1).expand(10**7)]}, r"meta.curve\[0\]: shape \[10000000\] is larger"),
                       ({"a": torch.zeros(600_000), "b": torch.zeros(600_000)}, "more than 1048576 elements")):
        p = _ckpt(tmp_path, lambda c, m=meta: c.__setitem__("meta", m))
        with pytest.raises(CrystalError, match=says):
            load_model(p)


def test_views_of_shared_data_still_load(tmp_path: Path) -> None:
    # a tied head saved as the one tensor under both names, and a slice of a larger tensor
    g = random_graph("tied_unnormalised", seed=4)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in g.state_dict().items()}
    sd["head.weight"] = sd["token_embed.weight"]
    sd["head.bias"] = torch.cat([sd["head.bias"], torch.ones(50)])[: len(sd["head.bias"])]
    torch.save({"model": sd, "config": g.config.to_dict()}, tmp_path / "m.pt")
    _same(g, load_model(tmp_path / "m.pt"))
    # found by a review: blocks sharing one module (ALBERT's way) name each tensor once a block, and were
    # refused from three blocks on
    g = random_graph(dict(vocab_size=20, d_model=8, n_ctx=8, n_heads=2, n_blocks=4, n_neurons=[3] * 4,
                          ffn_hidden=16), seed=5)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in g.state_dict().items()}
    for k in list(sd):
        if k.startswith("blocks.") and not k.startswith("blocks.0."):
            sd[k] = sd["blocks.0." + k.split(".", 2)[2]]
    torch.save({"model": sd, "config": g.config.to_dict()}, tmp_path / "albert.pt")
    got = load_model(tmp_path / "albert.pt")
    for b in range(1, 4):
        assert np.array_equal(got.blocks[b].attn.q_weight.data, got.blocks[0].attn.q_weight.data)


def test_a_compressed_checkpoint_is_refused_before_it_is_inflated(tmp_path: Path) -> None:
    import zipfile

    src = save_pt(random_graph("d40_h5", seed=2), tmp_path / "m.pt")
    packed = tmp_path / "packed.pt"
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(packed, "w", compression=zipfile.ZIP_DEFLATED) as zo:
        for info in zi.infolist():
            zo.writestr(info.filename, zi.read(info.filename))
    with pytest.raises(CrystalError, match=r"packed.pt: m/data.pkl: a compressed entry; torch.save writes none"):
        load_model(packed)


def test_the_json_beside_safetensors_is_utf8_whatever_the_locale(tmp_path: Path) -> None:
    import os

    g = random_graph("d40_h5", seed=5)
    chars = "é" + CHARS_22
    p = _safetensors(tmp_path, None)
    (tmp_path / "m.json").write_text(json.dumps({"config": g.config.to_dict(), "tokenizer": {"kind": "char",
                                                 "chars": chars}}, ensure_ascii=False), encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    code = (f"from crystalc.frontend import load_model; "
            f"assert load_model({str(p)!r}).tokenizer['chars'] == {ascii(chars)}")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr


CHARS_22 = "abcdefghijklmnopqrstuv"
