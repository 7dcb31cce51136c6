"""Tests for labutils.packfile: exact save/load round trips, sizes, and damaged files."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from models_support import tiny_bert

from labutils.packfile import (
    FORMAT_VERSION,
    PackedContents,
    PackedFileError,
    format_size_report,
    header_bytes,
    load_packed,
    save_packed,
    size_report,
)

# --- a test double for BitLinear: the duck type save_packed relies on ------------------------


@dataclass(frozen=True)
class FakeConfig:
    weight_bits: float = 1.58
    per_channel: bool = False


class FakeBitLinear(nn.Module):
    """``config.weight_bits`` and ``quantized_weight()``; forward = F.linear(x, codes * scale)."""

    def __init__(self, n_in: int, n_out: int, config: FakeConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.randn(n_out, n_in))
        self.bias = nn.Parameter(torch.randn(n_out))

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight.detach()
        dims = {"dim": 1, "keepdim": True} if self.config.per_channel else {}
        if self.config.weight_bits == 1.58:  # absmean ternary
            gamma = w.abs().mean(**dims)
            return torch.round(torch.clamp(w / (gamma + 1e-5), -1, 1)).to(torch.int8), gamma
        if self.config.weight_bits == 1:  # sign, mean|w|
            return torch.where(w >= 0, 1, -1).to(torch.int8), w.abs().mean(**dims)
        qp = 2 ** (int(self.config.weight_bits) - 1) - 1  # k-bit absmax
        scale = w.abs().amax(**dims) / qp
        return torch.clamp(torch.round(w / scale), -qp, qp).to(torch.int8), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale = self.quantized_weight()
        return F.linear(x, codes.float() * scale, self.bias)


class TinyNet(nn.Module):
    """Embedding -> BitLinear -> LayerNorm -> BitLinear -> tied output projection, plus a buffer."""

    def __init__(self, vocab=6, dim=4, hidden=5, bits=(1.58, 1.58), per_channel=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.up = FakeBitLinear(dim, hidden, FakeConfig(bits[0], per_channel))
        self.norm = nn.LayerNorm(hidden)
        self.down = FakeBitLinear(hidden, dim, FakeConfig(bits[1], per_channel))
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight  # tied: stored once
        self.register_buffer("steps", torch.tensor([3, 1, 4], dtype=torch.int64))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.down(self.norm(self.up(self.embed(ids)))))


IDS = torch.tensor([[0, 1, 2, 3, 4, 5, 1, 2]])


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [(1.58, 1.58), (1, 1), (4, 8), (1.58, 1)])
@pytest.mark.parametrize("ternary", ["ternary2", "ternary3"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_save_load_reproduces_outputs_exactly(tmp_path, bits, ternary, per_channel):
    model = TinyNet(vocab=11, dim=16, hidden=24, bits=bits, per_channel=per_channel, seed=1)
    path = tmp_path / "m.safetensors"
    save_packed(model, path, ternary=ternary)
    fresh = TinyNet(vocab=11, dim=16, hidden=24, bits=bits, per_channel=per_channel, seed=2)
    assert not torch.equal(_out(fresh), _out(model))
    loaded = load_packed(path, fresh)
    assert loaded is fresh
    assert torch.equal(_out(loaded), _out(model))
    for name in ("up", "down"):
        for a, b in zip(getattr(model, name).quantized_weight(), getattr(loaded, name).quantized_weight()):
            assert torch.equal(a, b)
    assert loaded.out.weight is loaded.embed.weight


def test_load_without_model_returns_codes_scales_and_floats(tmp_path):
    model = TinyNet(bits=(1.58, 4), seed=3)
    path = tmp_path / "m.safetensors"
    save_packed(model, path, ternary="ternary3")
    contents = load_packed(path)
    assert isinstance(contents, PackedContents)
    assert set(contents.state_dict) == set(model.state_dict())
    for name in ("up", "down"):
        codes, scale = getattr(model, name).quantized_weight()
        assert torch.equal(contents.codes[f"{name}.weight"], codes)
        assert torch.equal(contents.scales[f"{name}.weight"], scale)
        assert torch.equal(contents.state_dict[f"{name}.weight"], codes.float() * scale)
    assert contents.entries["up.weight"]["scheme"] == "ternary3"
    assert contents.entries["down.weight"]["scheme"] == "int4"
    assert contents.entries["out.weight"] == {"kind": "alias", "of": "embed.weight"}
    for name in ("embed.weight", "norm.weight", "norm.bias", "up.bias", "steps"):
        assert torch.equal(contents.state_dict[name], model.state_dict()[name])
    assert contents.state_dict["steps"].dtype == torch.int64


def test_fp16_storage_loads_back_in_the_original_dtype(tmp_path):
    model = TinyNet(seed=4)
    save_packed(model, tmp_path / "m.st", float_dtype="fp16")
    contents = load_packed(tmp_path / "m.st")
    norm = contents.state_dict["norm.weight"]
    assert norm.dtype == torch.float32
    assert torch.equal(norm, model.norm.weight.detach().half().float())


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_embeddings_group_quantized_like_labutils_quant(tmp_path, bits):
    from labutils import quant

    model = TinyNet(vocab=9, dim=12, seed=5)
    save_packed(model, tmp_path / "m.st", embeddings=f"int{bits}", group_size=4)
    contents = load_packed(tmp_path / "m.st")
    expected = quant.fake_quantize(model.embed.weight.detach(), bits, granularity="group", axis=0, group_size=4)
    assert torch.equal(contents.state_dict["embed.weight"], expected)
    assert contents.scales["embed.weight"].shape == (9, 3, 1)
    assert contents.codes["embed.weight"].abs().max() <= 2 ** (bits - 1) - 1


# --- sizes ----------------------------------------------------------------------------------


def _data_bytes(path: Path) -> int:
    data = path.read_bytes()
    return len(data) - 8 - int.from_bytes(data[:8], "little")


@pytest.mark.parametrize(
    ("bits", "ternary", "variant"),
    [(1.58, "ternary2", "2-bit"), (1.58, "ternary3", "1.6-bit"), (1, "ternary2", "1-bit"), (8, "ternary2", "int8")],
)
@pytest.mark.parametrize(("float_dtype", "embeddings"), [("fp16", "float"), ("fp32", "int4"), ("bf16", "int8")])
@pytest.mark.parametrize("per_channel", [False, True])
def test_size_formula_is_exactly_the_file_data(tmp_path, bits, ternary, variant, float_dtype, embeddings, per_channel):
    model = TinyNet(vocab=13, dim=8, hidden=23, bits=(bits, bits), per_channel=per_channel)
    path = tmp_path / "m.st"
    size = save_packed(model, path, ternary=ternary, float_dtype=float_dtype, embeddings=embeddings, group_size=4)
    rows = {r.variant: r for r in size_report(model, float_dtype=float_dtype, embeddings=embeddings, group_size=4)}
    assert size == path.stat().st_size
    assert _data_bytes(path) == rows[variant].total  # the rest of the file is the JSON header


def test_size_report_formulas_by_hand():
    model = TinyNet(vocab=13, dim=8, hidden=23)  # up: 23x8, down: 8x23, per-tensor scales
    rows = {r.variant: r for r in size_report(model, float_dtype="fp16")}
    n_linear, n_embed = 2 * 23 * 8, 13 * 8
    n_rest = 23 + 2 * 23 + 8  # up.bias, norm.weight/.bias, down.bias; out.weight is tied
    assert rows["fp32"].linear == 4 * n_linear and rows["fp32"].embeddings == 4 * n_embed
    assert rows["fp32"].rest == 4 * n_rest + 3 * 8  # + the int64 buffer
    assert rows["fp16"].total == 2 * (n_linear + n_embed + n_rest) + 24
    assert rows["int8"].linear == n_linear + 2 * 4
    assert rows["2-bit"].linear == 2 * math.ceil(23 * 8 / 4) + 2 * 4
    assert rows["1.6-bit"].linear == 2 * math.ceil(23 * 8 / 5) + 2 * 4
    assert rows["1-bit"].linear == 2 * math.ceil(23 * 8 / 8) + 2 * 4
    assert rows["1-bit"].embeddings == 2 * n_embed and rows["1-bit"].rest == 2 * n_rest + 24
    row = rows["2-bit"]
    assert math.isclose(sum(row.share(p) for p in ("embeddings", "linear", "rest")), 1.0)
    assert row.as_dict()["total"] == row.total
    assert "1.6-bit" in format_size_report(list(rows.values()))
    int4 = {r.variant: r for r in size_report(model, embeddings="int4", group_size=4)}
    assert int4["2-bit"].embeddings == math.ceil(n_embed * 4 / 8) + 4 * (n_embed // 4)


def test_size_report_of_a_float_model_counts_every_linear():
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 7), nn.Linear(7, 2))
    rows = {r.variant: r for r in size_report(model, per_channel=True)}
    assert rows["1-bit"].linear == math.ceil(42 / 8) + 7 * 4 + math.ceil(14 / 8) + 2 * 4
    assert rows["fp32"].rest == 4 * (7 + 2)


# --- the real BitLinear in a tiny BERT ------------------------------------------------------


def _tiny_bert(seed: int, bits: float, per_channel: bool):
    pytest.importorskip("transformers")
    bitlinear = pytest.importorskip("labutils.bitlinear")
    model = tiny_bert(seed, vocab_size=50).eval()
    report = bitlinear.quantize_(model, bitlinear.BitNetConfig(weight_bits=bits, per_channel=per_channel))
    assert len(report.replaced) == 12  # 2 layers x (q, k, v, attention out, intermediate, output)
    return model


@pytest.mark.parametrize(
    ("bits", "ternary"), [(1.58, "ternary2"), (1.58, "ternary3"), (1, "ternary2"), (4, "ternary2")]
)
@pytest.mark.parametrize("per_channel", [False, True])
def test_tiny_bert_with_real_bitlinear_round_trips_exactly(tmp_path, bits, ternary, per_channel):
    model = _tiny_bert(0, bits, per_channel)
    ids = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    path = tmp_path / "bert.safetensors"
    save_packed(model, path, ternary=ternary, float_dtype="fp16" if bits == 1 else "fp32")
    fresh = _tiny_bert(1, bits, per_channel)
    with torch.no_grad():
        assert not torch.equal(fresh(input_ids=ids).logits, reference)
    loaded = load_packed(path, fresh)
    with torch.no_grad():
        out = loaded(input_ids=ids).logits
    if bits == 1:  # fp16 storage of the float parts: close, not equal
        torch.testing.assert_close(out, reference, atol=1e-2, rtol=1e-2)
    else:
        assert torch.equal(out, reference)
    variant = {1.58: {"ternary2": "2-bit", "ternary3": "1.6-bit"}[ternary], 1: "1-bit", 4: None}[bits]
    if variant:
        rows = {r.variant: r for r in size_report(model, float_dtype="fp16" if bits == 1 else "fp32")}
        assert _data_bytes(path) == rows[variant].total


# --- damaged and foreign files --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> bytes:
    """A small file with every entry kind: packed ternary and int4, grouped, float, raw, alias."""
    model = TinyNet(vocab=5, dim=4, hidden=3, bits=(1.58, 4), seed=7)
    path = tmp_path_factory.mktemp("packed") / "tiny.safetensors"
    save_packed(model, path, embeddings="int4", group_size=2)
    return path.read_bytes()


def test_fuzz_truncations_and_byte_flips_raise_only_packed_file_error(tiny_file):
    assert isinstance(load_packed(tiny_file), PackedContents)
    rng = np.random.default_rng(0)
    cases = [tiny_file[:n] for n in range(len(tiny_file))]  # every truncation
    for _ in range(2500):  # 1 to 4 random bytes replaced by other values
        data = bytearray(tiny_file)
        for pos in rng.integers(0, len(data), rng.integers(1, 5)):
            data[pos] ^= int(rng.integers(1, 256))
        cases.append(bytes(data))
    for _ in range(200):  # junk appended
        cases.append(tiny_file + rng.integers(0, 256, rng.integers(1, 20)).astype(np.uint8).tobytes())
    assert len(cases) > 3000
    messages = set()
    for data in cases:
        with pytest.raises(PackedFileError) as info:
            load_packed(data)
        messages.add(str(info.value).split(":")[0])
    assert any("checksum mismatch" in m for m in messages)
    assert any("truncated" in m for m in messages)


def _rewrite(data: bytes, edit) -> bytes:
    """Apply ``edit(metadata, manifest, tensors)`` and re-save with a valid manifest checksum."""
    header_len = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_len])["__metadata__"]
    manifest = json.loads(metadata["manifest"])
    tensors = safetensors.torch.load(data)
    edit(metadata, manifest, tensors)
    metadata["manifest"] = json.dumps(manifest)
    metadata["manifest_sha256"] = hashlib.sha256(metadata["manifest"].encode()).hexdigest()
    return safetensors.torch.save(tensors, metadata=metadata)


def test_unchanged_rewrite_still_loads(tiny_file):
    assert isinstance(load_packed(_rewrite(tiny_file, lambda *_: None)), PackedContents)


def _drop(key):
    def edit(metadata, manifest, tensors):
        del tensors[key]
        del manifest["sha256"][key]

    return edit


def _set_entry(name, **values):
    def edit(metadata, manifest, tensors):
        manifest["entries"][name].update(values)

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda md, mf, t: md.update(format_version=str(FORMAT_VERSION + 1)), "unsupported format_version '2'"),
        (lambda md, mf, t: md.update(format="something.else"), "not a labutils packed file"),
        (_drop("up.weight:codes"), r"tensor 'up.weight:codes' is missing"),
        (_drop("norm.bias"), r"tensor 'norm.bias' is missing"),
        (_set_entry("up.weight", shape=[3, 5]), r"'up.weight:codes' is torch.uint8 \[3\], expected torch.uint8 \[4\]"),
        (_set_entry("norm.weight", shape=[4]), r"'norm.weight' is torch.float32 \[3\], expected torch.float32 \[4\]"),
        (_set_entry("up.weight", scale_shape=[3, 2]), "does not fit weight shape"),
        (_set_entry("up.weight", scheme="ternary9"), "unknown scheme"),
        (_set_entry("up.weight", kind="mystery"), "unknown kind"),
        (_set_entry("embed.weight", group_size=3), "inconsistent group layout"),
        (_set_entry("out.weight", of="nowhere"), "alias of 'nowhere'"),
        (_set_entry("norm.bias", dtype="float128"), "unknown dtype"),
        (lambda md, mf, t: mf["sha256"].update({"norm.bias": "0" * 64}), "checksum mismatch for tensor 'norm.bias'"),
    ],
)
def test_inconsistent_files_name_the_problem(tiny_file, edit, message):
    with pytest.raises(PackedFileError, match=message):
        load_packed(_rewrite(tiny_file, edit))


def test_invalid_codes_are_reported(tiny_file):
    def corrupt(metadata, manifest, tensors):
        codes = tensors["up.weight:codes"]
        codes[0] = 0xFF  # four 0b11 codes
        manifest["sha256"]["up.weight:codes"] = hashlib.sha256(codes.numpy().tobytes()).hexdigest()

    with pytest.raises(PackedFileError, match="codes of 'up.weight' do not unpack: .*0b11"):
        load_packed(_rewrite(tiny_file, corrupt))


def test_foreign_and_missing_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(3)}, plain)
    with pytest.raises(PackedFileError, match="not a labutils packed file"):
        load_packed(plain)
    with pytest.raises(PackedFileError, match="cannot read"):
        load_packed(tmp_path / "nope.safetensors")
    with pytest.raises(PackedFileError, match="truncated"):
        load_packed(b"")
    pickle_like = b"\x80\x04\x95" + bytes(100)
    with pytest.raises(PackedFileError):
        load_packed(pickle_like)


def test_a_file_that_does_not_fit_the_model(tmp_path):
    path = tmp_path / "m.st"
    save_packed(TinyNet(hidden=5, seed=0), path)
    with pytest.raises(PackedFileError, match=r"does not fit this model: 'up.weight' is \[5, 4\]"):
        load_packed(path, TinyNet(hidden=6))
    with pytest.raises(PackedFileError, match="does not fit this model: missing"):
        load_packed(path, nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(PackedFileError, match="quantizes to 1 bits, the file holds ternary2"):
        load_packed(path, TinyNet(hidden=5, bits=(1, 1.58)))
    with pytest.raises(PackedFileError, match=r"scales of shape \[5, 1\], the file \[\]"):
        load_packed(path, TinyNet(hidden=5, per_channel=True))


def test_bad_save_options(tmp_path):
    model = TinyNet()
    with pytest.raises(ValueError, match="ternary must be one of"):
        save_packed(model, tmp_path / "a", ternary="ternary4")
    with pytest.raises(ValueError, match="embeddings must be 'float' or 'int2'..'int8', got 'int9'"):
        save_packed(model, tmp_path / "a", embeddings="int9")
    with pytest.raises(ValueError, match="float_dtype must be one of"):
        save_packed(model, tmp_path / "a", float_dtype="fp8")
    with pytest.raises(ValueError, match="group_size=3 does not divide the row length 4"):
        save_packed(model, tmp_path / "a", embeddings="int4", group_size=3)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        save_packed("model", tmp_path / "a")
    broken = TinyNet(bits=(1, 1.58))
    broken.up.quantized_weight = lambda: (torch.zeros(5, 4, dtype=torch.int8), torch.tensor(1.0))
    with pytest.raises(ValueError, match="cannot pack the weight of 'up' as binary: .*found 0"):
        save_packed(broken, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_the_file_is_plain_safetensors(tmp_path):
    path = tmp_path / "m.safetensors"
    save_packed(TinyNet(), path)
    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        assert metadata["format"] == "labutils.packfile" and metadata["format_version"] == "1"
        assert f.get_tensor("up.weight:codes").dtype == torch.uint8


class NoisyBitLinear(FakeBitLinear):
    """A quantizer whose scale no latent weight reproduces (it adds fresh noise every call)."""

    def quantized_weight(self):
        codes, scale = super().quantized_weight()
        return codes, scale + torch.rand(()) * 1e-3


def test_an_unreproducible_quantizer_loads_with_a_warning(tmp_path):
    model = TinyNet(seed=8)
    model.up = NoisyBitLinear(4, 5, FakeConfig())
    save_packed(model, tmp_path / "m.st")
    fresh = TinyNet(seed=9)
    fresh.up = NoisyBitLinear(4, 5, FakeConfig())
    with pytest.warns(UserWarning, match="'up': found no latent weight"):
        load_packed(tmp_path / "m.st", fresh)
    assert torch.equal(fresh.norm.weight, model.norm.weight)


# --- real BitLinear in every dtype, scheme and granularity (issue 13) -----------------------

_SCHEMES = {  # scheme -> (weight_bits, save_packed's ternary option)
    "binary": (1, "ternary2"),
    "ternary2": (1.58, "ternary2"),
    "ternary3": (1.58, "ternary3"),
    **{f"int{k}": (k, "ternary2") for k in range(2, 9)},
}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_LOSSLESS_FLOAT = {"fp32": ["fp32"], "bf16": ["fp32", "bf16"], "fp16": ["fp32", "fp16"]}


class BitNet(nn.Module):
    """Embedding (plain, or trained with the int-k rounding its packed file applies) -> BitLinear
    -> ReLU -> BitLinear, all in ``dtype``: a real-BitLinear model for the round trip."""

    def __init__(self, config, dtype, *, vocab=7, dim=8, hidden=12, embedding_bits=None, group_size=4, seed=0):
        super().__init__()
        from labutils.bitlinear import BitLinear, GroupQuantEmbedding

        torch.manual_seed(seed)
        if embedding_bits is None:
            self.embed = nn.Embedding(vocab, dim)
        else:
            self.embed = GroupQuantEmbedding(vocab, dim, bits=embedding_bits, group_size=group_size)
        self.up = BitLinear(dim, hidden, config=config)
        self.down = BitLinear(hidden, dim, config=config)
        with torch.no_grad():  # latent weights of a trained model are not Kaiming-uniform
            for layer in (self.up, self.down):
                layer.weight.mul_(torch.exp(torch.randn_like(layer.weight)))
        self.to(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.embed(ids))))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    scheme=st.sampled_from(sorted(_SCHEMES)),
    dtype=st.sampled_from(sorted(_DTYPES)),
    per_channel=st.booleans(),
    act_bits=st.sampled_from([None, 1, 8]),
    norm=st.sampled_from(["rms", "layer", None]),
    embeddings=st.sampled_from(["float", "int4"]),
    dims=st.tuples(st.integers(1, 9), st.integers(1, 13)).map(lambda d: (4 * d[0], d[1])),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_property_round_trip_reproduces_the_forward_pass_exactly(
    tmp_path_factory, scheme, dtype, per_channel, act_bits, norm, embeddings, dims, seed, data
):
    """Every dtype the format stores, per tensor and per channel, every packing scheme, with and
    without int4 embeddings: the reloaded model computes bit for bit what the saved one computes
    (the float parts are stored losslessly; int4 embeddings are trained with their rounding, so
    the saved model already computes with the table the file stores)."""
    from labutils.bitlinear import BitNetConfig

    bits, ternary = _SCHEMES[scheme]
    config = BitNetConfig(weight_bits=bits, act_bits=act_bits, per_channel=per_channel, norm=norm)
    float_dtype = data.draw(st.sampled_from(_LOSSLESS_FLOAT[dtype]), label="float_dtype")
    dim, hidden = dims
    emb_bits = None if embeddings == "float" else 4
    model = BitNet(config, _DTYPES[dtype], dim=dim, hidden=hidden, embedding_bits=emb_bits, seed=seed).eval()
    path = tmp_path_factory.mktemp("prop") / "m.packed"
    save_packed(model, path, ternary=ternary, embeddings=embeddings, group_size=4, float_dtype=float_dtype)
    assert load_packed(path).entries["up.weight"]["scheme"] == scheme
    fresh = BitNet(config, _DTYPES[dtype], dim=dim, hidden=hidden, seed=seed + 1).eval()  # plain embedding
    loaded = load_packed(path, fresh)
    ids = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    for name in ("up", "down"):
        for a, b in zip(getattr(model, name).quantized_weight(), getattr(loaded, name).quantized_weight()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_precision_bitlinear_reloads_with_its_scale(tmp_path, dtype):
    """Issue 13's reproducer: the bf16 scale came back as 0.741 of the saved one."""
    from labutils.bitlinear import BitLinear

    torch.manual_seed(0)
    a = BitLinear(37, 29).to(dtype).eval()
    save_packed(a, tmp_path / "m")
    b = load_packed(tmp_path / "m", BitLinear(37, 29).to(dtype).eval())
    assert float(b.quantized_weight()[1] / a.quantized_weight()[1]) == 1.0
    x = torch.randn(4, 37).to(dtype)
    assert torch.equal(b(x), a(x))
    save_packed(b, tmp_path / "again")  # file -> model -> file: the same bytes
    assert (tmp_path / "again").read_bytes() == (tmp_path / "m").read_bytes()
    # A cast or a move keeps the loaded weights; training the latent weight again drops them.
    assert torch.equal(b.float()(x.float()), a.float()(x.float()))
    optimizer = torch.optim.SGD(b.parameters(), lr=0.1)
    b.train()
    b(x.float()).sum().backward()
    optimizer.step()
    assert not b.pinned


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}


def test_a_failed_load_leaves_the_model_untouched(tmp_path):
    """Every way a file may not fit: each parameter and buffer keeps its value, dtype and object."""
    from labutils.bitlinear import BitNetConfig

    per_channel = BitNet(BitNetConfig(per_channel=True), torch.float32, seed=1)
    save_packed(per_channel, tmp_path / "per_channel")
    save_packed(BitNet(BitNetConfig(), torch.float32, hidden=10, seed=1), tmp_path / "hidden10")
    save_packed(BitNet(BitNetConfig(weight_bits=1), torch.float32, seed=1), tmp_path / "binary")
    int4 = BitNet(BitNetConfig(weight_bits=4), torch.float32, seed=1)
    save_packed(int4, tmp_path / "int4")

    def forge_code(metadata, manifest, tensors):  # -8: a valid int4 stream value, not a 4-bit code
        codes = tensors["down.weight:codes"]
        codes[-1] = 0x00
        manifest["sha256"]["down.weight:codes"] = hashlib.sha256(codes.numpy().tobytes()).hexdigest()

    (tmp_path / "forged").write_bytes(_rewrite((tmp_path / "int4").read_bytes(), forge_code))
    cases = [
        ("per_channel", BitNetConfig(), r"'up'.*scale must have one element"),
        ("hidden10", BitNetConfig(), r"'up.weight' is \[10, 8\] in the file, \[12, 8\] in the model"),
        ("binary", BitNetConfig(), "quantizes to 1.58 bits, the file holds binary codes"),
        ("forged", BitNetConfig(weight_bits=4), r"'down'.*codes must lie in \[-7, 7\]"),
    ]
    for file, config, message in cases:
        for dtype in (torch.float32, torch.bfloat16):
            model = BitNet(config, dtype, seed=2)
            before, objects = _state(model), dict(model.named_parameters())
            pinned = [m.pinned for m in (model.up, model.down)]
            with pytest.raises(PackedFileError, match=message):
                load_packed(tmp_path / file, model)
            after = _state(model)
            assert after.keys() == before.keys()
            for name, tensor in before.items():
                assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), (file, name)
            assert all(a is b for a, b in zip(dict(model.named_parameters()).values(), objects.values()))
            assert [m.pinned for m in (model.up, model.down)] == pinned


def test_the_same_model_gives_the_same_bytes_every_time(tmp_path):
    """safetensors writes the metadata from a Rust HashMap, in a new order at almost every save
    (and in every process); the file sorts it, so a resumed benchmark can compare files by hash."""
    model = TinyNet(vocab=9, dim=8, hidden=6, bits=(1.58, 4), seed=3)
    saved = set()
    for _ in range(12):
        save_packed(model, tmp_path / "m.packed", embeddings="int4", group_size=4)
        saved.add((tmp_path / "m.packed").read_bytes())
    assert len(saved) == 1
    assert isinstance(load_packed(saved.pop()), PackedContents)


def test_header_bytes_is_where_the_tensor_data_starts(tiny_file, tmp_path):
    data = tiny_file
    (tmp_path / "tiny.safetensors").write_bytes(data)
    start = header_bytes(tmp_path / "tiny.safetensors")
    header = json.loads(data[8:start])  # exactly the JSON header, nothing of the data
    assert "__metadata__" in header and start == 8 + int.from_bytes(data[:8], "little")
    stub = tmp_path / "stub.safetensors"
    stub.write_bytes(data[:5])
    with pytest.raises(PackedFileError, match="truncated"):
        header_bytes(stub)
