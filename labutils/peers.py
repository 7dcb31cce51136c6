"""The book's packed CPU path next to llama.cpp: ``python -m labutils.bench peers`` (issue 15).

Chapter 8's decoders are written as GGUF files (:func:`labutils.export.export_gguf`) and run in
llama.cpp through ``llama-cpp-python`` (``pip install 'labutils[peers]'``: it compiles llama.cpp
for the machine on install), beside the book's own CPU path, in one process, on the same
threads:

- **rows**: ``torch fp32`` (the full-precision decoder in torch), ``book w1.58a8`` (the BitNet
  decoder through :func:`labutils.kernels.pack_model`: the Numba kernels of chapter 6),
  ``llama.cpp TQ2_0`` / ``TQ1_0`` (the ternary decoder as llama.cpp's ``bitnet`` architecture,
  codes at 2.0625 / 1.6875 bits a weight), ``llama.cpp Q8_0`` / ``F16`` (the full-precision
  decoder as ``llama``);
- **models**: the dummy sizes of chapter 8.5 (``SIZES["125m"]`` ..., random weights seeded as
  :func:`labutils.lm.experiment.decode_models` makes them) and the trained ``w1.58a8-l`` decoder
  (no full-precision weights of it are kept, so it has only the ternary rows);
- **speed**: llama-bench's split at batch 1: prompt processing (pp, tokens/s over one
  ``prompt``-token prefill) and text generation (tg, tokens/s over ``new_tokens`` greedy steps
  with the KV cache). Every row runs once per round, rows interleaved round by round, so a burst
  of load from elsewhere hits them alike; each ratio is :func:`labutils.measure.paired_ratio`
  (ratio of medians, spread of the per-round ratios) against llama.cpp TQ2_0 and torch fp32;
- **memory**: bytes of the weights each row holds (torch: its tensors; llama.cpp:
  ``llama_model_size``), the resident-set growth of loading a llama.cpp model and running it
  once (weights read into memory, ``use_mmap=False``, plus its KV cache and compute buffers;
  measured after handing freed heap pages back to the OS, still a lower bound where the heap
  reuses pages it keeps), and file sizes (GGUF; the book's ``.packed`` file);
- **agreement** (:func:`agreement`): greedy generation and logits of the same prompt through
  llama.cpp (TQ2_0) and the book's packed path, with the difference split into its two causes
  (see below).

Both sides' decode loops are the same: a prefill of the prompt, then ``argmax`` of the last
logits fed back one token at a time (the torch rows use
:func:`labutils.lm.experiment.decode_once`, chapter 8.5's loop; llama.cpp rows
:func:`llama_decode_once`, written to match). Two asymmetries remain and are recorded: llama.cpp
computes the head only for the last prompt position (the book's prefill computes it for all, a
~2 % share of the prefill at 700m), and llama.cpp keeps its KV cache in fp16 (the book: float32).

**Why llama.cpp's logits differ from the book's** (measured by :func:`agreement`, each part alone):

1. *The norm fold* (model): the decoder normalizes the input of its qkv and gate_up BitLinears
   twice (the block's RMSNorm, then the BitLinear's), llama.cpp's ``bitnet`` graph once; the
   exporter folds the two gains into one, exact only for a uniform block gain (the dummy models)
   and approximate for a trained model (``approximate_norms=True``; see :mod:`labutils.export`).
   :func:`fold_norms_like_llama` builds the book's decoder with that fold, so its logits minus
   the book's are the fold's share, measured without llama.cpp.
2. *Rounding* (engine): llama.cpp multiplies TQ weights with activations quantized to Q8_K (one
   scale per block of 256 values, not BitNet's one per token), runs the tied head in the
   embedding's type (F16 by default) and keeps K and V in fp16. llama.cpp minus the folded
   book decoder is this share; exporting the embedding as F32 shows how much of it is the head.

Results go to ``OUT/peers.json`` (with provenance: commit, CPU and flags, versions including
``llama_cpp.__version__`` and llama.cpp's system info, date, load average) and ``OUT/peers.html``
(plotly). GGUF files go to ``--work`` (default ``OUT/gguf``; not for git).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labutils.llamacpp import (
    llama_decode_once,
    llama_greedy,
    llama_last_logits,
    llama_logits,
    load_llama,
    require_llama_cpp,
)
from labutils.measure import resident_bytes
from labutils.runs import UsageError, parse_set_options, provenance, weights_bytes, write_json

__all__ = [
    "PeersPreset",
    "PRESETS",
    "TARGET_RATIO",
    "AGREEMENT_TOLERANCE",
    "PUBLISHED",
    "require_llama_cpp",
    "fold_norms_like_llama",
    "load_llama",
    "llama_last_logits",
    "llama_decode_once",
    "llama_greedy",
    "llama_logits",
    "agreement",
    "measure_model",
    "run_peers",
    "target_check",
    "engine_targets",
    "engine_decode_once",
    "table_rows",
    "chart",
    "add_arguments",
    "run_command",
]

TARGET_RATIO = 0.8  # issue 15: packed W1.58A8 generation tokens/s >= 0.8x llama.cpp TQ2_0
# The stated agreement: llama.cpp's logits within this share of the book's largest |logit| at
# every position (the trained decoder, with its approximate norm fold, measured 0.07 on Zen 3),
# and the greedy arg-max the same wherever the book's top two logits are further apart than that.
AGREEMENT_TOLERANCE = 0.1
BOOK_ROWS = ("torch fp32", "book w1.58a8", "book engine")
ENGINE_ROW = "book engine"  # the compiled decode engine (labutils.engine, issue 27) on the same packed model
# Issue 27's targets for the engine row against llama.cpp TQ2_0 (2 threads, same machine and run).
ENGINE_TARGETS = {"tg_700m": 1.5, "tg_every_size": 1.0, "pp": 1.5, "tg_2b4t_tokens_per_s": 28.6, "outside_kernels_share": 0.30}
# Random-weight models run by the engine and llama.cpp only (no torch model of them is built):
# name -> LMConfig-like shape. "2b4t" is shaped like BitNet b1.58 2B-4T (Ma et al., 2025): 30
# layers, hidden 2560, FFN 6912, 20 heads, 5 KV heads, vocabulary 128,256 (the tokenizer's ids
# padded with unused ones), as bitnet.cpp's own dummy-model benchmark builds it.
ENGINE_SIZES: dict[str, dict[str, int]] = {
    "2b4t": {"n_layer": 30, "d_model": 2560, "ffn_hidden": 6912, "n_head": 20, "n_kv_head": 5, "vocab_size": 128256},
}
TERNARY_GGUF = ("TQ2_0", "TQ1_0")
FLOAT_GGUF = ("Q8_0", "F16")
REFERENCE_ROW = "llama.cpp TQ2_0"

# Published, not measured here: quoted beside the table with their sources.
PUBLISHED: list[dict[str, str]] = [
    {
        "system": "bitnet.cpp TL2 (lookup-table kernels, x86)",
        "claim": "1.08-1.33x the speed of llama.cpp's TQ1_0 (as quoted in issue 15)",
        "source": "Wang, J., Zhou, H., Song, T., et al. (2025). Bitnet.cpp: Efficient Edge Inference for "
        "Ternary LLMs. arXiv:2502.11880 (ACL 2025)",
    },
    {
        "system": "bitnet.cpp (I2_S / TL kernels) vs llama.cpp FP16",
        "claim": "2.37-6.17x faster on x86 CPUs, 1.37-5.07x on ARM; a 100B BitNet b1.58 at 5-7 tokens/s on one CPU",
        "source": "microsoft/BitNet README; Wang, J., et al. (2024). 1-bit AI Infra: Part 1.1, Fast and Lossless "
        "BitNet b1.58 Inference on CPUs. arXiv:2410.16144",
    },
    {
        "system": "T-MAC (lookup-table mpGEMM)",
        "claim": "up to 4x the throughput of llama.cpp; BitNet-b1.58-3B at 30 tokens/s on one core, 71 on eight "
        "(Apple M2-Ultra), 11 on a Raspberry Pi 5",
        "source": "Wei, J., Cao, S., Cao, T., et al. (2025). T-MAC: CPU Renaissance via Table Lookup for Low-Bit "
        "LLM Deployment on Edge. EuroSys 2025, arXiv:2407.00088",
    },
]


@dataclass(frozen=True)
class PeersPreset:
    """Every setting of a run (recorded in the result file).

    Attributes:
        sizes: dummy sizes (keys of ``labutils.lm.experiment.SIZES``) to export and time.
        engine_sizes: random-weight models (keys of ``ENGINE_SIZES``) run by the engine and
            llama.cpp TQ2_0 only.
        float_gguf: llama.cpp's full-precision rows (Q8_0, F16) of the dummy sizes; () skips
            them (a llama.cpp build whose float kernels the CPU cannot run, e.g. AMX in a VM).
        trained_dir, trained_row: the trained ternary decoder (``<trained_dir>/<trained_row>.packed``)
            for the agreement check and its own speed rows; ``trained_dir`` None: the agreement
            runs on a seeded dummy of ``agreement_size`` with non-uniform norm gains instead.
        tokenizer: the chapter's ``tokenizer.json`` (its vocabulary sizes every model).
        prompt, new_tokens: pp prompt length and tg greedy tokens, batch 1.
        repeat: interleaved timed rounds (after one warm-up round).
        threads: torch, Numba and llama.cpp threads.
        engine_embedding: how the engine rows hold the tied embedding and head, "bfloat16" (the
            default: 2 bytes a weight, as the F16 ``token_embd`` the ternary GGUFs are then
            written with), "int8" (per-row codes: the ternary GGUFs' ``token_embd`` is then
            Q8_0, so llama.cpp reads as few head bytes) or "float32" (``DecoderEngine``'s
            ``embedding``).
        engine_kv_cache: how the engine rows cache K and V, "bfloat16" (the default: 2 bytes a
            value, as llama.cpp's default fp16 cache beside them) or "float32"
            (``DecoderEngine``'s ``kv_cache``).
        engine_gemv: how the engine rows run a generated token's projections, "lut" (the
            weights also held as table indices, 1.67 bits a weight, read by the lookup kernel;
            their weights MB count both copies), "tiles" (the 2-bit tiles alone) or "auto"
            (the default: "lut" on the avx2 kernel path) (``DecoderEngine``'s ``gemv``; each
            engine row records the one it ran as ``gemv``).
        agreement_text, agreement_tokens: the agreement prompt (after ``<|endoftext|>``) and how
            many greedy tokens both sides generate from it.
    """

    name: str
    sizes: tuple[str, ...] = ("125m", "350m", "700m")
    engine_sizes: tuple[str, ...] = ()
    float_gguf: tuple[str, ...] = FLOAT_GGUF
    trained_dir: str | None = "results/lm/full"
    trained_row: str = "w1.58a8-l"
    tokenizer: str = "results/lm/tokenizer.json"
    prompt: int = 128
    new_tokens: int = 32
    repeat: int = 3
    threads: int = 2
    engine_embedding: str = "bfloat16"
    engine_kv_cache: str = "bfloat16"
    engine_gemv: str = "auto"
    agreement_text: str = "This movie was"
    agreement_tokens: int = 32
    agreement_size: str = "s"
    seed: int = 0

    def __post_init__(self) -> None:
        from labutils.lm.experiment import SIZES

        unknown = [s for s in (*self.sizes, self.agreement_size) if s not in SIZES]
        if unknown:
            raise ValueError(f"sizes must be among {tuple(SIZES)}, got {unknown}")
        unknown = [s for s in self.engine_sizes if s not in ENGINE_SIZES]
        if unknown:
            raise ValueError(f"engine_sizes must be among {tuple(ENGINE_SIZES)}, got {unknown}")
        if any(t not in FLOAT_GGUF for t in self.float_gguf):
            raise ValueError(f"float_gguf must be among {FLOAT_GGUF}, got {self.float_gguf}")
        for name in ("prompt", "new_tokens", "repeat", "threads", "agreement_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        from labutils.engine.decoder import EMBEDDINGS, GEMVS, KV_CACHES

        if self.engine_embedding not in EMBEDDINGS:
            raise ValueError(f"engine_embedding must be one of {EMBEDDINGS}, got {self.engine_embedding!r}")
        if self.engine_kv_cache not in KV_CACHES:
            raise ValueError(f"engine_kv_cache must be one of {KV_CACHES}, got {self.engine_kv_cache!r}")
        if self.engine_gemv not in GEMVS:
            raise ValueError(f"engine_gemv must be one of {GEMVS}, got {self.engine_gemv!r}")
        if not self.agreement_text.strip():
            raise ValueError("agreement_text must not be empty")


PRESETS: dict[str, PeersPreset] = {
    # Seconds to a minute: one small dummy size (d=256: its ffn_down rows fall back to F16) and a
    # dummy agreement model; what CI-like runs and the tests exercise.
    "ci": PeersPreset(name="ci", sizes=("s",), trained_dir=None, prompt=32, new_tokens=8, repeat=2, agreement_tokens=8),
    # About 10 minutes on 2 Zen 3 cores (results/peers-zen3/README.md).
    "full": PeersPreset(name="full", repeat=5, engine_sizes=("2b4t",)),
}


# --------------------------------------------------------------------------- the models


def fold_norms_like_llama(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a ternary :class:`labutils.lm.model.Decoder` computing what llama.cpp's
    ``bitnet`` graph computes with the exported norms: each block's ``attn_norm`` / ``mlp_norm``
    gain replaced by the folded gain ``g_layer * g_block / rms(g_block)`` and the qkv / gate_up
    BitLinear norms removed (o and down keep theirs: ``attn_sub_norm`` / ``ffn_sub_norm``).

    Equal to ``model`` when every block gain is uniform; otherwise its logits minus ``model``'s
    are the approximate fold's share of the llama.cpp difference."""
    from labutils.bitlinear import BitLinear
    from labutils.export import fold_norm_gains

    if getattr(getattr(model, "config", None), "quant", None) != "w1.58a8":
        raise ValueError("fold_norms_like_llama takes a ternary Decoder (config.quant='w1.58a8')")
    folded = copy.deepcopy(model).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the approximation is the point here
        for i, block in enumerate(folded.blocks):
            for norm, layer in ((block.attn_norm, block.attn.qkv), (block.mlp_norm, block.mlp.gate_up)):
                if not isinstance(layer, BitLinear) or not isinstance(layer.norm, torch.nn.RMSNorm):
                    raise ValueError(f"block {i}: expected BitLinear projections with norm='rms'")
                gain = fold_norm_gains(norm.weight.numpy(), layer.norm.weight.numpy(), True, f"blk.{i}")
                norm.weight.copy_(torch.from_numpy(gain))
                layer.norm = None
    return folded


def _resolve(path: str | os.PathLike) -> Path:
    """``path`` as given if it exists, else relative to the repository root (results/...)."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    root = Path(__file__).resolve().parents[1]
    return root / path if (root / path).exists() else path


def _dummy(quant: str, size: str, vocab: int, max_len: int, seed: int) -> torch.nn.Module:
    """The dummy decoder of chapter 8.5 (``decode_models``: same config, same seed)."""
    from labutils.lm.experiment import PRESETS as LM_PRESETS
    from labutils.lm.experiment import row_config
    from labutils.lm.model import Decoder

    return Decoder(row_config(f"{quant}-{size}", LM_PRESETS["full"], vocab, max_seq_len=max_len), seed=seed).eval()


def ternary_embed_type(preset: PeersPreset) -> str:
    """The ``token_embd`` type of the ternary GGUFs beside the engine: Q8_0 when the engine's head
    is int8, else F16 (the engine's bfloat16 head reads as many bytes)."""
    return "Q8_0" if preset.engine_embedding == "int8" else "F16"


def _export(model, tokenizer, path: Path, weight_type: str, **kwargs) -> dict[str, Any]:
    """Write one GGUF file; {file, bytes, tensor types written (counts), seconds}."""
    from labutils.export import export_gguf

    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        types = export_gguf(model, tokenizer, path, weight_type, **kwargs)
    projections = {n: t for n, t in types.items() if n.startswith("blk.") and n.endswith(".weight") and "norm" not in n}
    counts: dict[str, int] = {}
    for t in projections.values():
        counts[t] = counts.get(t, 0) + 1
    return {"file": path.name, "bytes": path.stat().st_size, "projection_types": counts,
            "fallbacks": sorted(n for n, t in projections.items() if t != weight_type),
            "embedding_type": types["token_embd.weight"], "warnings": len(caught),
            "seconds": time.perf_counter() - start}  # fmt: skip


# --------------------------------------------------------------------------- timing


def _torch_engine(model: torch.nn.Module) -> Callable[[torch.Tensor, int], tuple[float, float]]:
    from labutils.lm.experiment import decode_once

    return lambda prompt, n: decode_once(model, prompt, n)


def engine_decode_once(engine, prompt: Sequence[int], new_tokens: int) -> tuple[float, float]:
    """:func:`llama_decode_once` for a :class:`labutils.engine.DecoderEngine`: the prefill of
    ``prompt`` (logits of its last position only, as llama.cpp), then ``new_tokens`` greedy steps."""
    engine.reset()
    start = time.perf_counter()
    logits = engine.forward(np.asarray(prompt, dtype=np.int64))
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = engine.step(int(np.argmax(logits)))
    return prefill, time.perf_counter() - start


def _engine_row(engine) -> Callable[[torch.Tensor, int], tuple[float, float]]:
    return lambda prompt, n: engine_decode_once(engine, prompt[0].tolist(), n)


def _llama_engine(llm) -> Callable[[torch.Tensor, int], tuple[float, float]]:
    return lambda prompt, n: llama_decode_once(llm, prompt[0].tolist(), n)


def measure_model(engines: dict[str, Callable[[torch.Tensor, int], tuple[float, float]]], prompt: torch.Tensor,
                  new_tokens: int, repeat: int, quiet: bool = True, desc: str = "") -> dict[str, dict[str, Any]]:  # fmt: skip
    """Interleaved pp/tg timing of ``engines`` ({row: fn(prompt [1, T] int64, new_tokens) ->
    (prefill seconds, generation seconds)}): one warm-up round, then ``repeat`` rounds, every
    row once per round in order, a short pause before each (other libraries' spinning threads).

    Returns {row: {"pp_tokens_per_s", "tg_tokens_per_s" (medians), "pp_seconds", "tg_seconds"
    (every round), "pp_vs_<ref>" / "tg_vs_<ref>" (paired_ratio against llama.cpp TQ2_0 and torch
    fp32 where those rows exist)}}."""
    from tqdm.auto import tqdm

    from labutils.measure import Timing, paired_ratio

    if prompt.dim() != 2 or prompt.shape[0] != 1 or prompt.dtype != torch.int64:
        raise ValueError(f"prompt must be int64 [1, T], got {prompt.dtype} {tuple(prompt.shape)}")
    for fn in engines.values():
        time.sleep(0.05)
        fn(prompt, min(2, new_tokens))  # warm-up: Numba compilation, llama.cpp's buffers
    seconds: dict[str, list[tuple[float, float]]] = {row: [] for row in engines}
    for _ in tqdm(range(repeat), disable=quiet, desc=desc or "rounds", mininterval=5.0):
        for row, fn in engines.items():
            time.sleep(0.05)
            seconds[row].append(fn(prompt, new_tokens))
    timings = {row: {"pp": Timing.from_seconds([p for p, _ in s]), "tg": Timing.from_seconds([g for _, g in s])}
               for row, s in seconds.items()}  # fmt: skip
    t_prompt = prompt.shape[1]
    out: dict[str, dict[str, Any]] = {}
    for row, t in timings.items():
        out[row] = {"pp_tokens_per_s": t_prompt / t["pp"].median, "tg_tokens_per_s": new_tokens / t["tg"].median,
                    "pp_seconds": t["pp"].seconds, "tg_seconds": t["tg"].seconds}  # fmt: skip
        for ref, key in ((REFERENCE_ROW, "tq2_0"), ("torch fp32", "fp32")):
            if ref in timings:
                for kind in ("pp", "tg"):
                    out[row][f"{kind}_vs_{key}"] = paired_ratio(timings[ref][kind], t[kind])
    return out


def _time_model(name: str, kind: str, ternary: torch.nn.Module, fp: torch.nn.Module | None, tokenizer,
                preset: PeersPreset, work: Path, quiet: bool) -> dict[str, Any]:  # fmt: skip
    """Export, load and time one model (dummy size or the trained decoder): every row of it."""
    from labutils.kernels import pack_model
    from labutils.packfile import save_packed

    n_ctx = preset.prompt + preset.new_tokens
    files: dict[str, dict[str, Any]] = {}
    approximate = kind == "trained"
    for wtype in TERNARY_GGUF:
        files[wtype] = _export(ternary, tokenizer, work / f"{name}-{wtype}.gguf", wtype, approximate_norms=approximate,
                               embed_type=ternary_embed_type(preset))
    if fp is not None:
        for wtype in preset.float_gguf:
            files[wtype] = _export(fp, tokenizer, work / f"{name}-{wtype}.gguf", wtype)
    packed_file = work / f"{name}.packed"
    files["book .packed"] = {"file": packed_file.name, "bytes": save_packed(
        ternary, packed_file, ternary="ternary2", embeddings="float", float_dtype="fp16")}  # fmt: skip
    non_embedding = ternary.num_parameters(embeddings=False)
    packed = pack_model(ternary, inplace=kind == "dummy")  # a dummy's latent weights are not needed again
    rows: dict[str, dict[str, Any]] = {}
    engines: dict[str, Callable] = {}
    if fp is not None:
        engines["torch fp32"] = _torch_engine(fp)
        rows["torch fp32"] = {"weights_bytes": weights_bytes(fp), "file_bytes": None}
    engines["book w1.58a8"] = _torch_engine(packed)
    rows["book w1.58a8"] = {"weights_bytes": weights_bytes(packed), "file_bytes": files["book .packed"]["bytes"]}
    from labutils.engine import DecoderEngine

    engine = DecoderEngine.from_decoder(packed, embedding=preset.engine_embedding, kv_cache=preset.engine_kv_cache,
                                        gemv=preset.engine_gemv)  # fmt: skip
    engines[ENGINE_ROW] = _engine_row(engine)
    rows[ENGINE_ROW] = {"weights_bytes": engine.nbytes, "file_bytes": files["book .packed"]["bytes"], "gemv": engine.gemv}
    llamas = {}
    llama_cpp = require_llama_cpp()
    for wtype in (*TERNARY_GGUF, *(preset.float_gguf if fp is not None else ())):
        before = resident_bytes(trim=True)
        llm = load_llama(work / files[wtype]["file"], n_ctx, preset.threads)
        llama_decode_once(llm, [0, 1], 1)  # first use allocates the compute buffers
        row = f"llama.cpp {wtype}"
        rows[row] = {"weights_bytes": int(llama_cpp.llama_model_size(llm.model)), "rss_growth_bytes": resident_bytes() - before,
                     "file_bytes": files[wtype]["bytes"]}  # fmt: skip
        llamas[row] = llm
        engines[row] = _llama_engine(llm)
    vocab = ternary.config.vocab_size
    prompt = torch.randint(3, vocab, (1, preset.prompt), generator=torch.Generator().manual_seed(preset.seed))
    timed = measure_model(engines, prompt, preset.new_tokens, preset.repeat, quiet, desc=name)
    for row, values in timed.items():
        rows[row] |= values
    for llm in llamas.values():
        llm.close()
    profile = _profile_generation_step(packed, preset)
    engine_profile = _profile_engine_step(engine, preset)
    if not quiet:
        tg = ", ".join(f"{r} {v['tg_tokens_per_s']:.1f}" for r, v in rows.items())
        print(f"[peers] {name}: tg tokens/s {tg}", flush=True)
    cfg = ternary.config
    return {"model": name, "kind": kind, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "d_model": cfg.d_model,
            "ffn_hidden": cfg.ffn_hidden, "vocab_size": vocab, "non_embedding_parameters": non_embedding,
            "files": files, "rows": rows, "book_tg_profile": profile, "engine_tg_profile": engine_profile}  # fmt: skip


def _profile_engine_step(engine, preset: PeersPreset) -> dict[str, float]:
    """The engine's generation step at position ``prompt`` (:meth:`DecoderEngine.profile_step`):
    seconds of the whole step, its ternary kernels alone, the float head alone, the rest."""
    if engine.shape.max_seq_len <= preset.prompt + 1:
        return {}
    return engine.profile_step(preset.prompt, repeat=10)


def _time_engine_model(name: str, tokenizer, preset: PeersPreset, work: Path, quiet: bool) -> dict[str, Any]:
    """A random-weight model of ``ENGINE_SIZES[name]`` built by the engine alone
    (:meth:`DecoderEngine.random`), written as TQ2_0 with the same codes
    (:func:`labutils.export.export_random_gguf`), and timed as the other models: the engine
    row against llama.cpp TQ2_0 (no torch row: no torch model of it exists)."""
    from labutils.engine import DecoderEngine, EngineShape
    from labutils.export import export_random_gguf

    n_ctx = preset.prompt + preset.new_tokens
    shape = EngineShape(**ENGINE_SIZES[name], max_seq_len=n_ctx)
    engine = DecoderEngine.random(shape, seed=preset.seed, progress=not quiet, embedding=preset.engine_embedding,
                                  kv_cache=preset.engine_kv_cache, gemv=preset.engine_gemv)  # fmt: skip
    path = work / f"{name}-TQ2_0.gguf"
    start = time.perf_counter()
    types = export_random_gguf(engine, tokenizer, path, "TQ2_0", embed_type=ternary_embed_type(preset))
    files = {"TQ2_0": {"file": path.name, "bytes": path.stat().st_size, "seconds": time.perf_counter() - start,
                       "embedding_type": types["token_embd.weight"]}}  # fmt: skip
    llama_cpp = require_llama_cpp()
    before = resident_bytes(trim=True)
    llm = load_llama(path, n_ctx, preset.threads)
    llama_decode_once(llm, [0, 1], 1)
    rows = {ENGINE_ROW: {"weights_bytes": engine.nbytes, "file_bytes": None, "gemv": engine.gemv},
            REFERENCE_ROW: {"weights_bytes": int(llama_cpp.llama_model_size(llm.model)),
                            "rss_growth_bytes": resident_bytes() - before, "file_bytes": path.stat().st_size}}  # fmt: skip
    prompt = torch.randint(3, shape.vocab_size, (1, preset.prompt), generator=torch.Generator().manual_seed(preset.seed))
    timed = measure_model({ENGINE_ROW: _engine_row(engine), REFERENCE_ROW: _llama_engine(llm)}, prompt,
                          preset.new_tokens, preset.repeat, quiet, desc=name)  # fmt: skip
    llm.close()
    for row, values in timed.items():
        rows[row] |= values
    if not quiet:
        print(f"[peers] {name}: tg tokens/s " + ", ".join(f"{r} {v['tg_tokens_per_s']:.1f}" for r, v in rows.items()), flush=True)
    widths = shape.widths()
    non_embedding = shape.n_layer * sum(n * k for n, k in widths.values())
    return {"model": name, "kind": "random", "n_layer": shape.n_layer, "n_head": shape.n_head, "n_kv_head": shape.n_kv_head,
            "d_model": shape.d_model, "ffn_hidden": shape.ffn_hidden, "vocab_size": shape.vocab_size,
            "non_embedding_parameters": non_embedding, "files": files, "rows": rows,
            "engine_tg_profile": _profile_engine_step(engine, preset)}  # fmt: skip


def _profile_generation_step(packed: torch.nn.Module, preset: PeersPreset) -> dict[str, float]:
    """Where one generation step of the book's packed decoder goes, at position ``prompt`` with
    the KV cache filled (:func:`labutils.kernels.profile_packed_forward`: seconds per step by
    category; the decoder's attention and residual Python are in ``other``)."""
    from labutils.kernels import profile_packed_forward
    from labutils.lm.model import KVCache

    room = packed.config.max_seq_len - preset.prompt - 1  # every profiled call advances the cache
    repeat = min(5, (room - 1) // 2)
    if repeat < 1:
        return {}
    cache = KVCache(packed.config, 1, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        packed(torch.randint(3, packed.config.vocab_size, (1, preset.prompt), generator=torch.Generator().manual_seed(1)), cache)
    return profile_packed_forward(packed, {"tokens": torch.tensor([[5]]), "cache": cache}, repeat=repeat, warmup=1)


# --------------------------------------------------------------------------- agreement


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@torch.no_grad()
def agreement(model: torch.nn.Module, tokenizer, text: str, new_tokens: int, work: Path, threads: int = 2,
              *, approximate_norms: bool = True) -> dict[str, Any]:  # fmt: skip
    """llama.cpp (the model exported as TQ2_0) against the book's packed CPU path, same prompt.

    ``model`` is a ternary Decoder (BitLinear layers, e.g. :func:`labutils.lm.experiment.load_row`);
    the prompt is ``<|endoftext|>`` + ``text``. Returns:

    - ``prompt_ids``; ``llama_tokenizer_agrees``: llama.cpp's own tokenization of ``text`` (with
      its BOS) equals the book's ids;
    - ``book_tokens`` / ``llama_tokens``: ``new_tokens`` greedy tokens each; ``common_prefix``:
      how many leading tokens agree;
    - ``last_position``: max |Δlogit| at the prompt's last position, the max |logit|, and whether
      the arg-max agrees;
    - ``teacher_forced``: on the book's greedy sequence (prompt + its tokens), every position:
      max |Δlogit|, share of positions whose arg-max agrees, the book's top-1 margin at the
      positions that disagree;
    - ``parts``: max |Δlogit| over that sequence of ``fold`` (book with llama.cpp's folded norms
      minus book: the model's share), ``rounding`` (llama.cpp minus the folded book: the
      engine's share), ``rounding_f32_embedding`` (the same with the embedding / head exported
      as F32), ``total`` (llama.cpp minus book).
    """
    from labutils.kernels import pack_model
    from labutils.lm.model import generate
    from labutils.lm.tokenizer import EOS

    cfg = model.config
    eos = tokenizer.token_to_id(EOS)
    prompt = [eos, *tokenizer.encode(text).ids]
    if len(prompt) + new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt ({len(prompt)}) + new_tokens ({new_tokens}) exceed max_seq_len={cfg.max_seq_len}")
    work.mkdir(parents=True, exist_ok=True)
    path, path_f32 = work / "agreement-TQ2_0.gguf", work / "agreement-TQ2_0-f32emb.gguf"
    files = {"TQ2_0": _export(model, tokenizer, path, "TQ2_0", approximate_norms=approximate_norms),
             "TQ2_0, F32 embedding": _export(model, tokenizer, path_f32, "TQ2_0", approximate_norms=approximate_norms,
                                             embed_type="F32")}  # fmt: skip
    packed = pack_model(model)
    folded = pack_model(fold_norms_like_llama(model))
    book_seq = generate(packed, torch.tensor([prompt]), new_tokens, temperature=0)[0].tolist()
    book_tokens = book_seq[len(prompt) :]
    book = packed(torch.tensor([book_seq]))[0].numpy()
    book_folded = folded(torch.tensor([book_seq]))[0].numpy()

    n_ctx = len(book_seq) + 1
    llm = load_llama(path, n_ctx, threads, logits_all=True)
    llama_tokens = llama_greedy(llm, prompt, new_tokens)
    theirs = llama_logits(llm, book_seq)
    llama_ids = llm.tokenize(text.encode(), add_bos=True)
    llm.close()
    llm = load_llama(path_f32, n_ctx, threads, logits_all=True)
    theirs_f32 = llama_logits(llm, book_seq)
    llm.close()

    common = next((i for i, (a, b) in enumerate(zip(book_tokens, llama_tokens)) if a != b), len(book_tokens))
    last = len(prompt) - 1
    agree = book.argmax(-1) == theirs.argmax(-1)
    top2 = np.sort(book, axis=-1)[:, -2:]
    margins = (top2[:, 1] - top2[:, 0])[~agree]
    return {
        "text": text, "prompt_ids": prompt, "new_tokens": new_tokens,
        "llama_tokenizer_agrees": list(llama_ids) == prompt, "llama_prompt_ids": list(llama_ids),
        "book_tokens": book_tokens, "llama_tokens": llama_tokens, "common_prefix": common,
        "book_text": tokenizer.decode(book_tokens), "llama_text": tokenizer.decode(llama_tokens),
        "last_position": {"max_abs_diff": _max_abs(book[last], theirs[last]), "max_abs_logit": float(np.abs(book[last]).max()),
                          "argmax_agrees": bool(agree[last])},
        "teacher_forced": {"positions": len(book_seq), "max_abs_diff": _max_abs(book, theirs),
                           "max_abs_logit": float(np.abs(book).max()), "argmax_agreement": float(agree.mean()),
                           "disagreeing_positions": [int(i) for i in np.flatnonzero(~agree)],
                           "book_top1_margin_where_disagreeing": [float(m) for m in margins]},
        "parts": {"fold": _max_abs(book_folded, book), "rounding": _max_abs(theirs, book_folded),
                  "rounding_f32_embedding": _max_abs(theirs_f32, book_folded), "total": _max_abs(theirs, book)},
        "files": files, "approximate_norms": approximate_norms,
    }  # fmt: skip


def _agreement_model(preset: PeersPreset, vocab: int) -> tuple[torch.nn.Module, str]:
    """The trained decoder named by the preset, or (``trained_dir`` None) a seeded dummy with
    non-uniform norm gains, so that the approximate fold is exercised too."""
    from labutils.lm.experiment import PRESETS as LM_PRESETS
    from labutils.lm.experiment import load_row

    if preset.trained_dir is not None:
        folder = _resolve(preset.trained_dir)
        weights = folder / f"{preset.trained_row}.packed"
        if not weights.is_file():
            raise FileNotFoundError(
                f"no trained model at {weights}: train it (results/lm/README.md) or use --set trained_dir=null "
                "for a dummy agreement model"
            )
        return load_row(folder, preset.trained_row, LM_PRESETS["full"], vocab), f"{preset.trained_row} (trained)"
    model = _dummy("w1.58a8", preset.agreement_size, vocab, LM_PRESETS["full"].seq_len, preset.seed)
    g = torch.Generator().manual_seed(preset.seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return model, f"w1.58a8-{preset.agreement_size} (dummy, norm gains 1 + 0.1 N(0, 1))"


# --------------------------------------------------------------------------- the run


def target_check(models: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 15's target on the largest dummy model measured: book w1.58a8 generation tokens/s
    >= TARGET_RATIO x llama.cpp TQ2_0 (median of the paired ratio; its spread reported)."""
    dummies = [m for m in models if m["kind"] == "dummy"]
    if not dummies:
        return {"pass": None, "reason": "no dummy model measured"}
    largest = max(dummies, key=lambda m: m["non_embedding_parameters"])
    ratio = largest["rows"]["book w1.58a8"]["tg_vs_tq2_0"]
    return {"text": f"packed W1.58A8 generation tokens/s >= {TARGET_RATIO}x llama.cpp TQ2_0 on the largest dummy model",
            "model": largest["model"], "ratio": ratio["ratio"], "spread": ratio["spread"], "verdict": ratio["verdict"],
            "pass": bool(ratio["ratio"] >= TARGET_RATIO)}  # fmt: skip


def engine_targets(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 27's targets for the engine row (``ENGINE_TARGETS``), each {"text", "measured",
    "pass"}: generation >= 1.5x llama.cpp TQ2_0 at 700m and >= 1.0x at every size (the paired
    ratio's median), prompt processing >= 1.5x at every size, the 2B-4T-shaped model at
    >= 28.6 tokens/s, and the time outside the integer kernels <= 30 % of a 700m step."""
    checks = []
    timed = [m for m in models if ENGINE_ROW in m["rows"] and "tg_vs_tq2_0" in m["rows"][ENGINE_ROW]]
    for m in timed:
        r = m["rows"][ENGINE_ROW]
        need = ENGINE_TARGETS["tg_700m"] if m["model"] == "700m" else ENGINE_TARGETS["tg_every_size"]
        checks.append({"text": f"{m['model']}: generation >= {need}x llama.cpp TQ2_0", "measured": r["tg_vs_tq2_0"]["ratio"],
                       "spread": r["tg_vs_tq2_0"]["spread"], "pass": bool(r["tg_vs_tq2_0"]["ratio"] >= need)})  # fmt: skip
        need = ENGINE_TARGETS["pp"]
        checks.append({"text": f"{m['model']}: prompt processing >= {need}x llama.cpp TQ2_0", "measured": r["pp_vs_tq2_0"]["ratio"],
                       "spread": r["pp_vs_tq2_0"]["spread"], "pass": bool(r["pp_vs_tq2_0"]["ratio"] >= need)})  # fmt: skip
        if m["model"] == "2b4t":
            need = ENGINE_TARGETS["tg_2b4t_tokens_per_s"]
            checks.append({"text": f"2b4t: generation >= {need} tokens/s (bitnet.cpp's published figure: 2 threads of an AMD EPYC 7V13, Zen 3, microsoft/BitNet src/README.md)",
                           "measured": r["tg_tokens_per_s"], "pass": bool(r["tg_tokens_per_s"] >= need)})  # fmt: skip
        profile = m.get("engine_tg_profile") or {}
        if m["model"] == "700m" and profile:
            need = ENGINE_TARGETS["outside_kernels_share"]
            checks.append({"text": f"700m: time outside the integer kernels <= {need:.0%} of a generation step",
                           "measured": profile["outside_kernels_share"], "pass": bool(profile["outside_kernels_share"] <= need)})  # fmt: skip
    return checks


def _provenance(llama_cpp) -> dict[str, Any]:
    from labutils.kernels import active_path

    prov = provenance("cpu")
    prov["versions"]["llama_cpp_python"] = llama_cpp.__version__
    try:
        import gguf  # noqa: F401
        import importlib.metadata as md

        prov["versions"]["gguf"] = md.version("gguf")
    except Exception:  # pragma: no cover - gguf is needed by the export anyway
        pass
    prov["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    prov["kernel_path"] = active_path()
    return prov


def run_peers(preset: PeersPreset, out: Path, work: Path | None = None, quiet: bool = False) -> dict[str, Any]:
    """Export, agree, time: write ``out/peers.json`` and ``out/peers.html``; return the result."""
    from labutils.lm.tokenizer import load_tokenizer
    from labutils.measure import threads

    llama_cpp = require_llama_cpp()
    out.mkdir(parents=True, exist_ok=True)
    work = work or out / "gguf"
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(_resolve(preset.tokenizer))
    vocab = tokenizer.get_vocab_size()
    started, load_before = time.perf_counter(), list(os.getloadavg())
    models = []
    with threads(preset.threads):
        model, described = _agreement_model(preset, vocab)
        agree = agreement(model, tokenizer, preset.agreement_text, preset.agreement_tokens, work, preset.threads,
                          approximate_norms=True)  # fmt: skip
        agree["model"] = described
        if preset.trained_dir is not None:  # the trained decoder's own speed rows (no fp weights of it here)
            models.append(_time_model(preset.trained_row, "trained", model, None, tokenizer, preset, work, quiet))
        del model
        max_len = preset.prompt + preset.new_tokens
        for size in preset.sizes:
            fp = _dummy("fp", size, vocab, max_len, preset.seed)
            ternary = _dummy("w1.58a8", size, vocab, max_len, preset.seed)
            models.append(_time_model(size, "dummy", ternary, fp, tokenizer, preset, work, quiet))
            del fp, ternary
        for size in preset.engine_sizes:
            models.append(_time_engine_model(size, tokenizer, preset, work, quiet))
    result = {
        "benchmark": "the book's packed W1.58A8 CPU path next to llama.cpp (issue 15)",
        "preset": asdict(preset), "threads": preset.threads, "prompt": preset.prompt, "new_tokens": preset.new_tokens,
        "repeat": preset.repeat, "models": models, "agreement": agree, "target": target_check(models),
        "engine_targets": engine_targets(models),
        "published": PUBLISHED, "seconds": time.perf_counter() - started, "load_average_before": load_before,
        "provenance": _provenance(llama_cpp),  # its load_average: at the end
    }  # fmt: skip
    write_json(out / "peers.json", result)
    chart(result).write_html(out / "peers.html", include_plotlyjs="cdn", full_html=True)
    if not quiet:
        print(format_table(result))
    return result


# --------------------------------------------------------------------------- table and chart


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat record per (model, row) of a result: tokens/s, ratios (median and spread) to
    llama.cpp TQ2_0, weights and file megabytes."""
    records = []
    for m in result["models"]:
        for row, v in m["rows"].items():
            rel = v.get("tg_vs_tq2_0", {"ratio": math.nan, "spread": [math.nan, math.nan]})
            rel_pp = v.get("pp_vs_tq2_0", {"ratio": math.nan, "spread": [math.nan, math.nan]})
            records.append({
                "model": m["model"], "kind": m["kind"], "params (M)": m["non_embedding_parameters"] / 1e6, "row": row,
                "pp tok/s": v["pp_tokens_per_s"], "tg tok/s": v["tg_tokens_per_s"],
                "pp vs TQ2_0": rel_pp["ratio"], "tg vs TQ2_0": rel["ratio"],
                "tg vs TQ2_0 (min)": rel["spread"][0], "tg vs TQ2_0 (max)": rel["spread"][1],
                "weights (MB)": v["weights_bytes"] / 1e6,
                "file (MB)": v["file_bytes"] / 1e6 if v.get("file_bytes") else math.nan,
                "RSS growth (MB)": v["rss_growth_bytes"] / 1e6 if "rss_growth_bytes" in v else math.nan,
            })  # fmt: skip
    return records


def format_table(result: dict[str, Any]) -> str:
    """The table as text (printed by the command)."""
    lines = [f"{'model':>18} {'row':>16} {'pp tok/s':>9} {'tg tok/s':>9} {'tg vs TQ2_0 (spread)':>22} {'weights MB':>11} {'file MB':>8}"]
    for r in table_rows(result):
        spread = f"{r['tg vs TQ2_0']:.2f} ({r['tg vs TQ2_0 (min)']:.2f}-{r['tg vs TQ2_0 (max)']:.2f})"
        lines.append(f"{r['model']:>18} {r['row']:>16} {r['pp tok/s']:>9.1f} {r['tg tok/s']:>9.1f} {spread:>22} "
                     f"{r['weights (MB)']:>11.1f} {r['file (MB)']:>8.1f}")  # fmt: skip
    t = result["target"]
    if t.get("pass") is not None:
        lines.append(f"target: {t['text']}: {t['model']} {t['ratio']:.2f}x (spread {t['spread'][0]:.2f}-{t['spread'][1]:.2f}) "
                     f"-> {'PASS' if t['pass'] else 'MISS'}")  # fmt: skip
    for check in result.get("engine_targets", []):
        lines.append(f"engine target: {check['text']}: {check['measured']:.2f} -> {'PASS' if check['pass'] else 'MISS'}")
    a = result["agreement"]
    lines.append(f"agreement ({a['model']}): {a['common_prefix']}/{a['new_tokens']} greedy tokens equal, "
                 f"max |dlogit| {a['teacher_forced']['max_abs_diff']:.3f} (max |logit| {a['teacher_forced']['max_abs_logit']:.1f}), "
                 f"arg-max agreement {a['teacher_forced']['argmax_agreement']:.0%}; parts: fold {a['parts']['fold']:.3f}, "
                 f"rounding {a['parts']['rounding']:.3f}")  # fmt: skip
    return "\n".join(lines)


def chart(result: dict[str, Any]):
    """Plotly figure: generation and prompt tokens/s per model and row (bars, per-round min-max
    as error bars), and each row's generation speed relative to llama.cpp TQ2_0."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=3, subplot_titles=("generation (tg), tokens/s", "prompt (pp), tokens/s",
                                                        "generation vs llama.cpp TQ2_0 (x)"))  # fmt: skip
    rows = list(dict.fromkeys(r for m in result["models"] for r in m["rows"]))
    for row in rows:
        have = [m for m in result["models"] if row in m["rows"]]
        names = [m["model"] for m in have]
        for col, kind in ((1, "tg"), (2, "pp")):
            n = result["new_tokens"] if kind == "tg" else result["prompt"]
            speeds = [m["rows"][row][f"{kind}_tokens_per_s"] for m in have]
            rates = [[n / s for s in m["rows"][row][f"{kind}_seconds"]] for m in have]
            fig.add_bar(x=names, y=speeds, name=row, legendgroup=row, showlegend=col == 1, row=1, col=col,
                        error_y=dict(type="data", symmetric=False, array=[max(r) - s for r, s in zip(rates, speeds)],
                                     arrayminus=[s - min(r) for r, s in zip(rates, speeds)]))  # fmt: skip
        ratios = [m["rows"][row].get("tg_vs_tq2_0") for m in have]
        if all(ratios):
            fig.add_bar(x=names, y=[r["ratio"] for r in ratios], name=row, legendgroup=row, showlegend=False, row=1, col=3,
                        error_y=dict(type="data", symmetric=False, array=[r["spread"][1] - r["ratio"] for r in ratios],
                                     arrayminus=[r["ratio"] - r["spread"][0] for r in ratios]))  # fmt: skip
    fig.add_hline(y=TARGET_RATIO, line_dash="dot", annotation_text=f"target {TARGET_RATIO}x (book w1.58a8)", row=1, col=3)
    prov = result["provenance"]
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(barmode="group", height=440,
                      title=f"Batch 1, {result['threads']} threads, {prov['cpu']} ({prov['kernel_path']}), "
                            f"llama-cpp-python {prov['versions'].get('llama_cpp_python')}")  # fmt: skip
    return fig


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=tuple(PRESETS), default="ci")
    parser.add_argument("--work", type=Path, default=None, help="where the GGUF files go (default OUT/gguf; not for git)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--quiet", action="store_true")


def run_command(args: argparse.Namespace) -> dict[str, Any]:
    try:
        preset = dataclasses.replace(PRESETS[args.preset], **parse_set_options(args.overrides, PeersPreset))
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    try:
        require_llama_cpp()
    except ImportError as error:
        raise UsageError(str(error)) from None
    out = Path(args.out or "peers")
    result = run_peers(preset, out, args.work, quiet=args.quiet)
    return {"out": str(out), "target": result["target"], "pass": result["target"].get("pass")}
