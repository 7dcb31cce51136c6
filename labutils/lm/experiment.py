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
  While it trains, ``progress_<row>.json`` holds the curve so far.
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
import copy
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from labutils.lm.model import QUANTS, Decoder, KVCache, LMConfig, generate
from labutils.lm.tokenizer import EOS, NEG, POS, clean_review, load_tokenizer, train_tokenizer
from labutils.runs import UsageError, device_name, parse_set_options, provenance, save_safetensors, weights_bytes, write_json

__all__ = ["SIZES", "LMPreset", "PRESETS", "STAGES", "row_config", "run", "add_arguments", "run_command"]

# name: (n_layer, n_head, d_model)
SIZES: dict[str, tuple[int, int, int]] = {
    "xs": (2, 2, 64),
    "s": (4, 4, 256),
    "m": (6, 6, 384),
    "l": (8, 8, 512),
    # Dummy sizes for the CPU decode benchmark (random ternary weights, as bitnet.cpp's
    # dummy-model benchmark): Llama-shaped, non-embedding parameters 85 M, 302 M, 680 M.
    "125m": (12, 12, 768),
    "350m": (24, 16, 1024),
    "700m": (24, 24, 1536),
}
STAGES = ("tokenizer", "train", "eval", "lora", "attention", "decode")
DECODE_ROWS = ("fp32", "int8", "w1.58a8")


@dataclass(frozen=True)
class LMPreset:
    """Every setting of a run (recorded in each result file)."""

    name: str
    data_source: str = "auto"
    train_reviews: int | None = None  # None: all 25,000 (minus the holdout)
    test_reviews: int | None = None
    holdout_reviews: int = 500
    vocab_size: int = 8192
    sizes: tuple[str, ...] = ("s", "m", "l")
    seq_len: int = 256
    batch_size: int = 64
    steps: int = 2000
    warmup_steps: int = 200
    lr_fp: float = 1e-3
    lr_bitnet: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    eval_every: int = 250
    eval_tokens: int = 500_000
    lora_size: str = "l"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_steps: int = 800
    lora_lr: float = 1e-3
    gen_reviews: int = 200
    gen_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 50
    attention_lengths: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)
    attention_batch: int = 4
    decode_sizes: tuple[str, ...] = ("125m", "350m", "700m")
    decode_prompt: int = 128
    decode_tokens: int = 32
    decode_repeat: int = 3
    threads: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [s for s in (*self.sizes, self.lora_size, *self.decode_sizes) if s not in SIZES]
        if unknown:
            raise ValueError(f"sizes must be among {tuple(SIZES)}, got {unknown}")
        for name in ("vocab_size", "seq_len", "batch_size", "steps", "eval_every", "lora_rank", "gen_reviews", "gen_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps}")


PRESETS: dict[str, LMPreset] = {
    # Minutes on a laptop CPU: the pipeline end to end on the embedded sample, nothing learned well.
    "ci": LMPreset(
        name="ci", data_source="sample", holdout_reviews=50, vocab_size=1024, sizes=("xs",), seq_len=64,
        batch_size=16, steps=60, warmup_steps=10, eval_every=30, eval_tokens=4096, lora_size="xs",
        lora_rank=4, lora_steps=20, gen_reviews=8, gen_tokens=24, attention_lengths=(64, 128, 256),
        attention_batch=1, decode_sizes=("xs", "s"), decode_prompt=32, decode_tokens=8, decode_repeat=2,
    ),
    # One GPU: every row as its own process (see results/lm/README.md).
    "full": LMPreset(name="full"),
}


def rows_of(preset: LMPreset) -> tuple[str, ...]:
    return tuple(f"{quant}-{size}" for size in preset.sizes for quant in QUANTS)


def row_config(row: str, preset: LMPreset, vocab_size: int, attention: str = "sdpa", max_seq_len: int | None = None) -> LMConfig:
    """The LMConfig of a row such as ``"w1.58a8-m"``."""
    quant, _, size = row.rpartition("-")
    if quant not in QUANTS or size not in SIZES:
        raise ValueError(f"a row is <quant>-<size> with quant in {QUANTS} and size in {tuple(SIZES)}, got {row!r}")
    n_layer, n_head, d_model = SIZES[size]
    return LMConfig(
        vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, d_model=d_model,
        max_seq_len=max_seq_len or preset.seq_len, quant=quant, attention=attention,
    )  # fmt: skip


# --------------------------------------------------------------------------- small helpers


def _provenance(device: torch.device) -> dict[str, Any]:
    return provenance(device_name(device))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _progress(iterable, quiet: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=quiet, mininterval=5.0, **kwargs)


# --------------------------------------------------------------------------- data


@dataclass
class Reviews:
    """Cleaned review texts and labels (1 = positive) of the three splits."""

    train: list[str]
    train_labels: list[int]
    holdout: list[str]
    test: list[str]
    test_labels: list[int]


def load_reviews(preset: LMPreset) -> Reviews:
    """IMDb reviews: train minus a seeded holdout, and test, cleaned (``clean_review``)."""
    from labutils.data import load_imdb

    source = None if preset.data_source == "auto" else preset.data_source
    train = load_imdb("train", source=source, seed=preset.seed)
    test = load_imdb("test", source=source, seed=preset.seed)
    texts, labels = [clean_review(t) for t in train["text"]], list(train["label"])
    hold = preset.holdout_reviews
    if hold >= len(texts):
        raise ValueError(f"holdout_reviews={hold} leaves no training review (of {len(texts)})")
    n_train = len(texts) - hold if preset.train_reviews is None else min(preset.train_reviews, len(texts) - hold)
    test_texts = [clean_review(t) for t in test["text"]][: preset.test_reviews]
    return Reviews(
        train=texts[hold : hold + n_train], train_labels=labels[hold : hold + n_train], holdout=texts[:hold],
        test=test_texts, test_labels=list(test["label"])[: len(test_texts)],
    )  # fmt: skip


def token_stream(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """All texts encoded and joined, each after an ``<|endoftext|>``: int64 [n_tokens]."""
    eos = tokenizer.token_to_id(EOS)
    pieces = []
    for encoding in tokenizer.encode_batch(list(texts)):
        pieces.append([eos, *encoding.ids])
    return torch.tensor([t for piece in pieces for t in piece], dtype=torch.int64)


def random_windows(stream: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs, targets [batch, length]: windows at random offsets, targets shifted by one."""
    starts = torch.randint(0, stream.numel() - length - 1, (batch,), generator=generator, device=stream.device)
    idx = starts[:, None] + torch.arange(length + 1, device=stream.device)
    windows = stream[idx]
    return windows[:, :-1], windows[:, 1:]


@torch.no_grad()
def perplexity(model: Decoder, stream: torch.Tensor, length: int, max_tokens: int, batch: int = 32) -> float:
    """exp(mean next-token loss) over consecutive windows of ``length`` covering the first
    ``max_tokens`` tokens of ``stream`` (each window predicts its own last ``length`` tokens)."""
    model.eval()
    device = next(model.parameters()).device
    n = min(max_tokens, stream.numel() - 1) // length
    if n < 1:
        raise ValueError(f"the stream has {stream.numel()} tokens: fewer than one window of {length + 1}")
    windows = stream[: n * length + 1].to(device)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        idx = torch.arange(i, min(n, i + batch), device=device)[:, None] * length + torch.arange(length + 1, device=device)
        w = windows[idx]
        with _autocast(device):
            logits = model(w[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
        total, count = total + float(loss), count + w[:, 1:].numel()
    return math.exp(total / count)


# --------------------------------------------------------------------------- train


def learning_rate(step: int, peak: float, preset: LMPreset) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * peak``."""
    if step < preset.warmup_steps:
        return peak * (step + 1) / preset.warmup_steps
    progress = (step - preset.warmup_steps) / max(1, preset.steps - preset.warmup_steps)
    low = preset.min_lr_ratio * peak
    return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * progress))


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.95); matrices decay, norms do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def train_row(row: str, preset: LMPreset, out: Path, tokenizer, reviews: Reviews, device: torch.device, quiet: bool) -> dict:
    """Train one decoder; write its weights and ``train_<row>.json``; return the result."""
    torch.manual_seed(preset.seed)
    config = row_config(row, preset, tokenizer.get_vocab_size())
    model = Decoder(config, seed=preset.seed).to(device)
    peak = preset.lr_fp if config.quant == "fp" else preset.lr_bitnet
    optimizer = _optimizer(model, peak, preset.weight_decay, device)
    train = token_stream(tokenizer, reviews.train).to(device)
    holdout = token_stream(tokenizer, reviews.holdout)
    test = token_stream(tokenizer, reviews.test)
    generator = torch.Generator(device=device).manual_seed(preset.seed)  # same batches for every row
    history, start, running = [], time.perf_counter(), []
    for step in _progress(range(preset.steps), quiet, desc=row):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, peak, preset)
        x, y = random_windows(train, preset.batch_size, preset.seq_len, generator)
        with _autocast(device):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(loss.detach())
        if (step + 1) % preset.eval_every == 0 or step + 1 == preset.steps:
            train_loss = float(torch.stack(running).mean())
            running = []
            hold_ppl = perplexity(model, holdout, preset.seq_len, preset.eval_tokens)
            history.append({"step": step + 1, "tokens": (step + 1) * preset.batch_size * preset.seq_len,
                            "train_loss": train_loss, "holdout_ppl": hold_ppl})  # fmt: skip
            # The curve so far, on disk: a run killed later (a lent GPU taken back) keeps it.
            write_json(out / f"progress_{row}.json", {"row": row, "lr": peak, "history": history})
            if not quiet:
                print(f"[{row}] step {step + 1}: train loss {train_loss:.3f}, holdout ppl {hold_ppl:.2f}", flush=True)
    seconds = time.perf_counter() - start
    # On the training device, before saving: 2026-12-01's BitNet rows at sizes m and l spent their
    # last GPU minutes evaluating this on the host CPU, after a save had moved the model there.
    test_ppl = perplexity(model, test, preset.seq_len, preset.eval_tokens)
    weights = _save_row(model, out, row)
    result = {
        "row": row, "config": config.to_dict(), "preset": asdict(preset), "lr": peak,
        "parameters": model.num_parameters(), "non_embedding_parameters": model.num_parameters(embeddings=False),
        "train_tokens_available": int(train.numel()), "tokens_seen": preset.steps * preset.batch_size * preset.seq_len,
        "history": history, "holdout_ppl": history[-1]["holdout_ppl"], "test_ppl": test_ppl,
        "train_seconds": seconds, "weights_file": weights.name, "weights_bytes": weights.stat().st_size,
        "provenance": _provenance(device),
    }  # fmt: skip
    if config.quant != "fp":
        # What a reader downloads: the packed file loaded back (fp16 embedding), same test text.
        loaded = load_row(out, row, preset, tokenizer.get_vocab_size()).to(device)
        result["test_ppl_packed"] = perplexity(loaded, test, preset.seq_len, preset.eval_tokens)
    write_json(out / f"train_{row}.json", result)
    return result


def evaluate_row(row: str, preset: LMPreset, out: Path, tokenizer, reviews: Reviews, device: torch.device) -> dict:
    """Holdout and test perplexity of a trained row's weights file in ``out`` -> ``eval_<row>.json``.

    For weights whose training run stopped before it wrote ``train_<row>.json`` (its curve, if
    any, is in ``progress_<row>.json``), and to re-check a committed file on another machine."""
    model = load_row(out, row, preset, tokenizer.get_vocab_size()).to(device)
    holdout, test = token_stream(tokenizer, reviews.holdout), token_stream(tokenizer, reviews.test)
    weights = weights_path(out, row)
    result = {
        "row": row, "weights_file": weights.name, "weights_bytes": weights.stat().st_size,
        "holdout_ppl": perplexity(model, holdout, preset.seq_len, preset.eval_tokens),
        "test_ppl": perplexity(model, test, preset.seq_len, preset.eval_tokens),
        "parameters": model.num_parameters(), "non_embedding_parameters": model.num_parameters(embeddings=False),
        "provenance": _provenance(device),
    }  # fmt: skip
    write_json(out / f"eval_{row}.json", result)
    return result


def weights_path(out: str | Path, row: str) -> Path:
    """Where a row's weights live in ``out``: ``<row>.safetensors`` (fp) or ``<row>.packed`` (ternary)."""
    return Path(out) / (f"{row}.safetensors" if row.startswith("fp-") else f"{row}.packed")


def _save_row(model: Decoder, out: Path, row: str) -> Path:
    from labutils.packfile import save_packed

    model = copy.deepcopy(model).float().cpu().eval()  # a copy: the caller's model stays where it is
    path = weights_path(out, row)
    if model.config.quant == "fp":
        save_safetensors(model, path)
    else:
        save_packed(model, path, ternary="ternary2", embeddings="float", float_dtype="fp16")
    return path


def load_row(out: str | Path, row: str, preset: LMPreset, vocab_size: int, attention: str = "sdpa", max_seq_len: int | None = None) -> Decoder:
    """A trained row's decoder (float32, eval mode) from its file in ``out``."""
    from safetensors.torch import load_model

    from labutils.packfile import load_packed

    model = Decoder(row_config(row, preset, vocab_size, attention, max_seq_len))
    if model.config.quant == "fp":
        load_model(model, weights_path(out, row))
    else:
        load_packed(weights_path(out, row), model)
    return model.eval()


def add_preset_lora_(model: Decoder, preset: LMPreset) -> list[str]:
    """Freeze ``model`` and wrap every BitLinear in the preset's LoRA adapters, in place (the one
    wrapping that training and :func:`load_lora` share). Returns the wrapped layers' names."""
    from labutils.bitlinear import add_lora_

    model.requires_grad_(False)
    return add_lora_(model, rank=preset.lora_rank, alpha=preset.lora_alpha, seed=preset.seed)


def load_lora(out: str | Path, preset: LMPreset, vocab_size: int) -> Decoder:
    """The LoRA stage's model: ``w1.58a8-<lora_size>`` from ``out`` with the adapters of
    ``out/lora_adapters.safetensors`` (float32, eval mode). The ternary codes are the file's.

    Raises ValueError when the adapters do not fit the wrapped model (another size or rank).
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
    out.mkdir(parents=True, exist_ok=True)
    dev = _device(device)
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
