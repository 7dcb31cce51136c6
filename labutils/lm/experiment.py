"""The language-model experiment of chapter 8: ``python -m labutils.bench lm``.

BitNet b1.58's central experiment in miniature: full-precision and BitNet b1.58 decoders of the
same sizes trained the same way (same tokens, steps, schedule, seed; each variant at its own
learning rate, as in the paper) on the IMDb training reviews, compared by perplexity on the test
reviews. Then LoRA adapters on the frozen ternary model learn to write a requested sentiment, and
chapter 7's classifier grades the generated reviews.

Stages (each writes JSON with provenance into ``--out``; a stage whose file exists is skipped,
so a killed run resumes where it stopped):

- ``tokenizer``: byte-level BPE on the training reviews -> ``tokenizer.json``.
- ``train``: one decoder per row ("fp-s", "w1.58a8-m", ...) -> ``train_<row>.json`` (loss curve,
  holdout and test perplexity) and the weights (``<row>.packed`` for ternary rows, written with
  :func:`labutils.packfile.save_packed`; ``<row>.safetensors`` for full precision).
  While it trains, ``progress_<row>.json`` holds the curve so far. The trainer
  (:mod:`labutils.lm.train`) runs on ``accelerate``: this stage alone may run as several processes
  under ``accelerate launch ... -m labutils.bench lm --stage train``.
- ``eval``: holdout and test perplexity of each row's weights file already in ``--out`` ->
  ``eval_<row>.json`` (weights whose training run was cut short after saving them).
- ``lora``: LoRA on the frozen ternary model of ``lora_size`` -> ``lora.json`` (share of generated
  reviews the classifier reads as the requested sentiment, base vs LoRA; samples) and
  ``lora_adapters.safetensors``. Needs ``--classifier`` (a trained IMDb classifier's
  ``model.safetensors``, e.g. the benchmark's ``teacher/model.safetensors``) and ``--model``.
- ``attention``: eager vs SDPA forward time and peak memory vs context length, and the KV cache's
  bytes vs length -> ``attention_<device>.json``.
- ``decode``: batch-1 prompt processing and generation tokens/s on the CPU, FP32 vs torch INT8 vs
  packed W1.58A8 (the book's kernels), on dummy models of growing size -> ``decode_cpu.json``.

Rows are ``<quant>-<size>`` with quant in ``fp``, ``w1.58a8`` and size a key of ``SIZES``.
Data: ``labutils.data.load_imdb`` (``LABBOOK_IMDB_DIR`` or the hub; the ``ci`` preset uses the
embedded sample). The holdout (``holdout_reviews`` training reviews, never trained on) chooses
nothing here: it is reported beside the test perplexity so that a learning-rate choice made on it
stays honest.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from labutils.lm.model import Decoder, KVCache, generate
from labutils.lm.preset import PRESETS, SIZES, LMPreset, row_config, rows_of
from labutils.lm.tokenizer import EOS, NEG, POS, load_tokenizer, train_tokenizer
from labutils.lm.train import (
    Reviews, _autocast, _device, _progress, _provenance, evaluate_row, launched_processes, learning_rate, load_reviews,
    load_row, perplexity, random_windows, save_row, token_stream, train_row, weights_path,
)  # fmt: skip
from labutils.runs import UsageError, parse_set_options, weights_bytes, write_json

# The settings live in labutils.lm.preset and the training of a row in labutils.lm.train; their
# names are also importable from here, where chapter 8 and labutils.peers have always found them.
__all__ = [
    "SIZES", "LMPreset", "PRESETS", "STAGES", "rows_of", "row_config", "run", "add_arguments", "run_command",
    "Reviews", "load_reviews", "token_stream", "random_windows", "perplexity", "learning_rate", "train_row",
    "evaluate_row", "weights_path", "save_row", "load_row", "add_preset_lora_", "load_lora", "run_lora",
    "run_attention", "decode_models", "decode_once", "run_decode",
]  # fmt: skip

STAGES = ("tokenizer", "train", "eval", "lora", "attention", "decode")
DECODE_ROWS = ("fp32", "int8", "w1.58a8")


def add_preset_lora_(model: Decoder, preset: LMPreset) -> list[str]:
    """Freeze ``model`` and wrap its BitLinears in the preset's LoRA adapters (rank ``lora_rank``,
    every BitLinear but those matching ``lora_skip``), in place: the one wrapping that training
    and :func:`load_lora` share. Returns the wrapped layers' names."""
    from labutils.bitlinear import add_lora_

    model.requires_grad_(False)
    return add_lora_(model, rank=preset.lora_rank, alpha=preset.lora_alpha, skip=preset.lora_skip, seed=preset.seed)


def load_lora(out: str | Path, preset: LMPreset, vocab_size: int) -> Decoder:
    """The LoRA stage's model: ``w1.58a8-<lora_size>`` from ``out`` with the adapters of
    ``out/lora_adapters.safetensors`` (float32, eval mode). The ternary codes are the file's.

    Raises ValueError when the adapters do not fit the wrapped model (another size, rank or
    ``lora_skip``).
    """
    from safetensors.torch import load_file

    model = load_row(out, f"w1.58a8-{preset.lora_size}", preset, vocab_size)
    add_preset_lora_(model, preset)
    adapters = load_file(str(Path(out) / "lora_adapters.safetensors"))
    expected = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    if set(adapters) != set(expected):
        missing, extra = sorted(set(expected) - set(adapters)), sorted(set(adapters) - set(expected))
        raise ValueError(f"lora_adapters.safetensors does not fit w1.58a8-{preset.lora_size} at rank {preset.lora_rank}: "
                         f"missing {missing[:3]}, unexpected {extra[:3]}")  # fmt: skip
    for name, tensor in adapters.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"lora_adapters.safetensors does not fit: {name} is {tuple(tensor.shape)}, the model's {tuple(expected[name].shape)}")
        expected[name].data.copy_(tensor)
    return model.eval()


# --------------------------------------------------------------------------- LoRA: write a requested sentiment


def _tagged_batches(tokenizer, texts: Sequence[str], labels: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs, targets [n, length]: ``<|endoftext|> <pos|neg>`` + the review's first tokens;
    targets -100 past the review's end (and for the tag itself, which the user supplies)."""
    eos, tags = tokenizer.token_to_id(EOS), (tokenizer.token_to_id(NEG), tokenizer.token_to_id(POS))
    seqs = torch.full((len(texts), length + 1), eos, dtype=torch.int64)
    targets = torch.full((len(texts), length), -100, dtype=torch.int64)
    for i, (encoding, label) in enumerate(zip(tokenizer.encode_batch(list(texts)), labels)):
        ids = [eos, tags[label], *encoding.ids, eos][: length + 1]
        seqs[i, : len(ids)] = torch.tensor(ids)
        targets[i, 1 : len(ids) - 1] = torch.tensor(ids[2:])
    return seqs[:, :-1], targets


class SentimentJudge:
    """Chapter 7's IMDb classifier (MiniLM fine-tuned), reading generated reviews: 1 = positive."""

    def __init__(self, weights: str | Path, model_path: str | None, device: torch.device) -> None:
        from safetensors.torch import load_model

        from labutils.benchmark import teacher_skeleton
        from labutils.models import load_tokenizer as load_bert_tokenizer

        self.model = teacher_skeleton(model_path).to(device).eval()
        load_model(self.model, str(weights), device=str(device))
        self.tokenizer = load_bert_tokenizer(model_path)
        self.device = device

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        labels = []
        for i in range(0, len(texts), 64):
            enc = self.tokenizer(list(texts[i : i + 64]), truncation=True, max_length=256, padding=True, return_tensors="pt")
            logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
            labels.append(logits.argmax(-1).cpu().numpy())
        return np.concatenate(labels)


def sample_reviews(model: Decoder, tokenizer, prompt_ids: Sequence[int], n: int, preset: LMPreset, seed: int) -> list[str]:
    """n reviews generated from the same prompt (batched, seeded), decoded up to the first EOS."""
    device = next(model.parameters()).device
    eos = tokenizer.token_to_id(EOS)
    prompt = torch.tensor([list(prompt_ids)] * n, device=device)
    with _autocast(device):
        tokens = generate(model, prompt, preset.gen_tokens, temperature=preset.temperature, top_k=preset.top_k,
                          seed=seed, stop_token=eos)  # fmt: skip
    texts = []
    for row in tokens[:, len(prompt_ids) :].tolist():
        row = row[: row.index(eos)] if eos in row else row
        texts.append(tokenizer.decode(row))
    return texts


def _sentiment_scores(model, tokenizer, judge: SentimentJudge, preset: LMPreset) -> tuple[dict, dict]:
    eos = tokenizer.token_to_id(EOS)
    scores, samples = {}, {}
    for tag, want in ((POS, 1), (NEG, 0)):
        texts = sample_reviews(model, tokenizer, [eos, tokenizer.token_to_id(tag)], preset.gen_reviews, preset, preset.seed + want)
        predicted = judge(texts)
        scores[tag] = float(np.mean(predicted == want))
        samples[tag] = texts[:5]
    scores["requested"] = (scores[POS] + scores[NEG]) / 2
    return scores, samples


def run_lora(preset: LMPreset, out: Path, tokenizer, reviews: Reviews, device: torch.device, classifier: str, model_path: str | None, quiet: bool) -> dict:
    """LoRA adapters on the frozen ternary model; the classifier grades base vs LoRA generations."""
    row = f"w1.58a8-{preset.lora_size}"
    model = load_row(out, row, preset, tokenizer.get_vocab_size()).to(device)
    judge = SentimentJudge(classifier, model_path, device)
    base_scores, base_samples = _sentiment_scores(model, tokenizer, judge, preset)
    frozen = [(m, m.quantized_weight()[0].clone()) for _, m in _bitlinears(model)]
    wrapped = add_preset_lora_(model, preset)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=preset.lora_lr, weight_decay=0.0)
    inputs, targets = _tagged_batches(tokenizer, reviews.train, reviews.train_labels, preset.seq_len)
    generator = torch.Generator().manual_seed(preset.seed)
    history, start = [], time.perf_counter()
    for step in _progress(range(preset.lora_steps), quiet, desc="lora"):
        model.train()
        pick = torch.randint(0, len(inputs), (preset.batch_size,), generator=generator)
        x, y = inputs[pick].to(device), targets[pick].to(device)
        for group in optimizer.param_groups:
            group["lr"] = preset.lora_lr * min(1.0, (step + 1) / 50)
        with _autocast(device):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0:
            history.append({"step": step + 1, "loss": float(loss)})
    seconds = time.perf_counter() - start
    lora_scores, lora_samples = _sentiment_scores(model, tokenizer, judge, preset)
    unchanged = all(torch.equal(codes, m.quantized_weight()[0]) for m, codes in frozen)
    adapters = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    _save_tensors(adapters, out / "lora_adapters.safetensors")
    result = {
        "row": row, "preset": asdict(preset), "wrapped_layers": wrapped,
        "trainable_parameters": sum(p.numel() for p in params), "history": history, "train_seconds": seconds,
        "base": base_scores, "lora": lora_scores, "samples": {"base": base_samples, "lora": lora_samples},
        "ternary_weights_unchanged": unchanged, "provenance": _provenance(device),
    }  # fmt: skip
    write_json(out / "lora.json", result)
    return result


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write named tensors as one safetensors file (float32, CPU), atomically."""
    from safetensors.torch import save

    from labutils.packfile import sorted_metadata, write_atomic

    write_atomic(path, sorted_metadata(save({k: v.float().cpu().contiguous() for k, v in tensors.items()})))


def _bitlinears(model: torch.nn.Module):
    from labutils.bitlinear import BitLinear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BitLinear)]


# --------------------------------------------------------------------------- attention and length


def _seconds(device: torch.device, fn) -> float:
    """Wall seconds of one call of fn (CUDA: synchronized before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _peak_bytes(device: torch.device, fn) -> int:
    """Peak extra bytes of one call of fn (CUDA: max_memory_allocated; CPU: resident memory)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from labutils.measure import peak_memory

    return peak_memory(fn).peak_bytes


def _attention_forward(preset: LMPreset, size: str, vocab_size: int, length: int, how: str, device: torch.device):
    """A no-grad forward pass of a random fp decoder of ``size`` over [attention_batch, length] tokens."""
    config = row_config(f"fp-{size}", preset, vocab_size, attention=how, max_seq_len=length)
    model = Decoder(config, seed=preset.seed).to(device).eval()
    tokens = torch.randint(0, vocab_size, (preset.attention_batch, length), generator=torch.Generator().manual_seed(0)).to(device)

    def forward():
        with torch.no_grad(), _autocast(device):
            model(tokens)

    return config, forward


def run_attention(preset: LMPreset, out: Path, vocab_size: int, device: torch.device, quiet: bool, repeats: int = 5) -> dict:
    """Forward time (median of ``repeats``, eager and SDPA interleaved) and peak memory of the
    largest size, eager vs SDPA, at each length in ``attention_lengths`` (batch
    ``attention_batch``), plus the KV cache's bytes.

    All timing comes first: on Linux the CPU memory measurement pins glibc's mmap threshold for
    the rest of the process (see ``labutils.measure.peak_memory``), after which every large
    buffer is a fresh mapping that page-faults, and forward passes timed after it run slower."""
    size = preset.sizes[-1]
    rows = []
    for length in _progress(preset.attention_lengths, quiet, desc="attention (time)"):
        forwards = {how: _attention_forward(preset, size, vocab_size, length, how, device) for how in ("eager", "sdpa")}
        for _, forward in forwards.values():
            forward()  # warm-up (kernel selection, allocator)
        times: dict[str, list[float]] = {how: [] for how in forwards}
        for _ in range(repeats):  # interleaved, so a change of load hits both alike
            for how, (_, forward) in forwards.items():
                times[how].append(_seconds(device, forward))
        number_bytes = 2 if device.type == "cuda" else 4  # the cache in the forward pass's dtype
        for how, (config, _) in forwards.items():
            kv_numbers = 2 * config.n_layer * preset.attention_batch * length * config.d_model
            rows.append({"length": length, "attention": how, "seconds": float(np.median(times[how])),
                         "seconds_spread": [float(min(times[how])), float(max(times[how]))],
                         "kv_cache_bytes": kv_numbers * number_bytes, "kv_cache_bytes_int8": kv_numbers})  # fmt: skip
        del forwards
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in _progress(rows, quiet, desc="attention (memory)"):
        _, forward = _attention_forward(preset, size, vocab_size, row["length"], row["attention"], device)
        forward()
        row["peak_bytes"] = int(max(_peak_bytes(device, forward) for _ in range(2)))
        del forward
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"size": size, "batch": preset.attention_batch, "repeats": repeats, "rows": rows, "provenance": _provenance(device)}
    write_json(out / f"attention_{device.type}.json", result)
    return result


# --------------------------------------------------------------------------- decoding on the CPU


def decode_models(size: str, preset: LMPreset, vocab_size: int) -> dict[str, torch.nn.Module]:
    """The three decode rows of one size, random weights (seeded): FP32, torch dynamic INT8 of the
    FP32 model, and the BitNet b1.58 model packed for the CPU kernels (``pack_model``)."""
    from labutils.benchmark import int8_dynamic
    from labutils.kernels import pack_model

    max_len = preset.decode_prompt + preset.decode_tokens
    fp32 = Decoder(row_config(f"fp-{size}", preset, vocab_size, max_seq_len=max_len), seed=preset.seed).eval()
    ternary = Decoder(row_config(f"w1.58a8-{size}", preset, vocab_size, max_seq_len=max_len), seed=preset.seed).eval()
    packed = pack_model(ternary, inplace=True)
    return {"fp32": fp32, "int8": int8_dynamic(fp32), "w1.58a8": packed}


@torch.no_grad()
def decode_once(model: Decoder, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Seconds of the prefill of ``prompt`` [1, T] and of ``new_tokens`` greedy steps after it."""
    cache = KVCache(model.config, 1, dtype=torch.float32, device="cpu")
    start = time.perf_counter()
    logits = model(prompt, cache)[:, -1]
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(logits.argmax(-1, keepdim=True), cache)[:, -1]
    return prefill, time.perf_counter() - start


def run_decode(preset: LMPreset, out: Path, vocab_size: int, quiet: bool) -> dict:
    """llama-bench's split at batch 1 on ``threads`` threads: prompt processing (pp, tokens/s over
    a ``decode_prompt``-token prefill) and text generation (tg, tokens/s over ``decode_tokens``
    greedy steps with the KV cache), FP32 vs INT8 vs packed W1.58A8, at each of ``decode_sizes``.
    Rows are interleaved within each repeat; medians and the per-repeat ratios' spread are kept."""
    from labutils.kernels import active_path

    torch.set_num_threads(preset.threads)
    try:
        import numba

        numba.set_num_threads(min(preset.threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:  # pragma: no cover - numba is a dependency
        pass
    prompt = torch.randint(3, vocab_size, (1, preset.decode_prompt), generator=torch.Generator().manual_seed(preset.seed))
    sizes = []
    for size in _progress(preset.decode_sizes, quiet, desc="decode"):
        models = decode_models(size, preset, vocab_size)
        for model in models.values():
            decode_once(model, prompt[:, :8], 2)  # warm-up: Numba compilation, allocator
        runs: dict[str, list[tuple[float, float]]] = {row: [] for row in models}
        for _ in range(preset.decode_repeat):
            for row, model in models.items():
                runs[row].append(decode_once(model, prompt, preset.decode_tokens))
        rows = {}
        for row, samples in runs.items():
            pp = [preset.decode_prompt / p for p, _ in samples]
            tg = [preset.decode_tokens / g for _, g in samples]
            rows[row] = {"pp_tokens_per_s": float(np.median(pp)), "tg_tokens_per_s": float(np.median(tg)),
                         "pp_samples": pp, "tg_samples": tg, "weights_bytes": weights_bytes(models[row])}  # fmt: skip
        for row in rows:
            for kind in ("pp", "tg"):
                ratios = [a / b for a, b in zip(rows[row][f"{kind}_samples"], rows["fp32"][f"{kind}_samples"])]
                rows[row][f"{kind}_vs_fp32"] = {"median": float(np.median(ratios)), "min": min(ratios), "max": max(ratios)}
        n_layer, n_head, d_model = SIZES[size]
        config = models["fp32"].config
        sizes.append({"size": size, "n_layer": n_layer, "n_head": n_head, "d_model": d_model,
                      "non_embedding_parameters": models["fp32"].num_parameters(embeddings=False),
                      "kv_cache_bytes_fp32": KVCache(config, 1, dtype=torch.float32, device="meta").nbytes,
                      "rows": rows})  # fmt: skip
        if not quiet:
            tg = ", ".join(f"{r} {v['tg_tokens_per_s']:.1f}" for r, v in rows.items())
            print(f"[decode] {size}: tg tokens/s {tg}", flush=True)
        del models
    result = {"threads": preset.threads, "prompt": preset.decode_prompt, "new_tokens": preset.decode_tokens,
              "repeat": preset.decode_repeat, "kernel_path": active_path(), "sizes": sizes,
              "provenance": _provenance(torch.device("cpu"))}  # fmt: skip
    write_json(out / "decode_cpu.json", result)
    return result


# --------------------------------------------------------------------------- command line


def run(preset: LMPreset, out: Path, *, stages: Sequence[str], rows: Sequence[str] | None = None, device: str = "auto",
        classifier: str | None = None, model_path: str | None = None, tokenizer_path: str | None = None, quiet: bool = False) -> dict:  # fmt: skip
    """Run ``stages`` into ``out`` (see the module docstring); returns what each stage wrote."""
    rank, processes = launched_processes()
    if processes > 1 and set(stages) != {"train"}:
        raise UsageError(f"under accelerate launch ({processes} processes) only --stage train runs (with --tokenizer or "
                         f"OUT/tokenizer.json already there), got --stage {','.join(stages)}")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    dev = _device(device)
    if rank == 0:  # one writer: the other processes of accelerate launch read the same folder
        write_json(out / "preset.json", asdict(preset))
    done: dict[str, Any] = {}
    tok_file = Path(tokenizer_path) if tokenizer_path else out / "tokenizer.json"
    reviews = None
    if "tokenizer" in stages and not tok_file.is_file():
        reviews = load_reviews(preset)
        train_tokenizer(reviews.train, preset.vocab_size).save(str(tok_file))
        done["tokenizer"] = str(tok_file)
    tokenizer = load_tokenizer(tok_file) if {"train", "eval", "lora"} & set(stages) or tok_file.is_file() else None
    vocab = tokenizer.get_vocab_size() if tokenizer else preset.vocab_size
    if "train" in stages:
        for row in rows or rows_of(preset):
            if (out / f"train_{row}.json").is_file():
                continue
            reviews = reviews or load_reviews(preset)
            done[row] = train_row(row, preset, out, tokenizer, reviews, dev, quiet)
    if "eval" in stages:
        for row in rows or rows_of(preset):
            if (out / f"eval_{row}.json").is_file():
                continue
            reviews = reviews or load_reviews(preset)
            done[f"eval_{row}"] = evaluate_row(row, preset, out, tokenizer, reviews, dev)
    if "lora" in stages and not (out / "lora.json").is_file():
        if classifier is None:
            raise ValueError("the lora stage needs --classifier (a trained IMDb classifier's model.safetensors)")
        reviews = reviews or load_reviews(preset)
        done["lora"] = run_lora(preset, out, tokenizer, reviews, dev, classifier, model_path, quiet)
    if "attention" in stages:
        done["attention"] = run_attention(preset, out, vocab, dev, quiet)
    if "decode" in stages:
        done["decode"] = run_decode(preset, out, vocab, quiet)
    return done


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=tuple(PRESETS), default="ci")
    parser.add_argument("--stage", default="tokenizer,train", help=f"comma-separated, among {','.join(STAGES)}")
    parser.add_argument("--rows", default=None, help="comma-separated rows (default: every size x quant of the preset)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--classifier", default=None, help="a trained IMDb classifier's model.safetensors (lora stage)")
    parser.add_argument("--model", default=None, help="the MiniLM folder the classifier was built on")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.json to use instead of OUT/tokenizer.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--quiet", action="store_true")


def run_command(args: argparse.Namespace) -> dict[str, Any]:
    stages = tuple(s.strip() for s in args.stage.split(","))
    if any(s not in STAGES for s in stages):
        raise UsageError(f"--stage must be among {STAGES}, got {args.stage!r}")
    try:
        preset = dataclasses.replace(PRESETS[args.preset], **parse_set_options(args.overrides, LMPreset))
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    rows = tuple(r.strip() for r in args.rows.split(",")) if args.rows else None
    out = Path(args.out or "lm-benchmark")
    done = run(preset, out, stages=stages, rows=rows, device=args.device, classifier=args.classifier,
               model_path=args.model, tokenizer_path=args.tokenizer, quiet=args.quiet)  # fmt: skip
    return {"out": str(out), "stages": list(stages), "wrote": sorted(done)}
