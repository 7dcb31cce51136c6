"""Training and evaluating one decoder of chapter 8 (a row such as ``"w1.58a8-m"``), on
Hugging Face ``accelerate``, and the files a row's weights live in.

:func:`train_row` runs the same way on one CPU, one GPU, or several processes under
``accelerate launch`` (DDP), as :func:`labutils.distill.train` does for the IMDb students::

    accelerate launch --multi_gpu --num_processes 4 -m labutils.bench lm --preset full --stage train \\
        --rows w1.58a8-l --tokenizer results/lm/tokenizer.json --out DIR
    accelerate launch --multi_gpu --num_processes 2 -m labutils.bench lm ... --device cpu   # 2 CPU processes

(``--multi_gpu`` is accelerate's torchrun launcher; ``--device cpu`` makes each process a CPU
one, talking over gloo. ``accelerate launch --cpu --num_processes 2`` starts a single process
unless MPI is set up: the result file's ``processes`` says how many there were.)

The ``Accelerator`` prepares the model (DDP when launched), the optimizer and the batch source
(a DataLoader over endless random windows of the training tokens). Each optimizer step sees
``batch_size`` windows whatever the number of processes: every process draws the same seeded
windows and keeps its own ``batch_size / processes`` of them (``split_batches``), and DDP averages
the gradients, so N processes train the model one process trains, up to the order of
floating-point sums. With ``grad_accum_steps`` > 1 a step is that many micro-batches, their
gradients accumulated (``accelerator.accumulate``). Perplexities are summed over the processes'
shares of the windows. Only the main process writes files and shows progress.

One process runs exactly the plain loop this module replaced (same windows, optimizer and
schedule: ``tests/test_lm_train.py`` holds its losses, perplexities and weights against it).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from labutils.lm.model import Decoder
from labutils.lm.preset import LMPreset, row_config
from labutils.lm.tokenizer import EOS, clean_review
from labutils.runs import device_name, provenance, save_safetensors, write_json

__all__ = [
    "Reviews", "load_reviews", "token_stream", "random_windows", "WindowDraws", "perplexity", "learning_rate",
    "weight_decay", "stage2_step", "make_accelerator", "launched_processes", "train_row", "evaluate_row",
    "weights_path", "save_row", "load_row",
]  # fmt: skip


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


class WindowDraws(torch.utils.data.IterableDataset):
    """Endless (input, target) pairs, int64 [length] each, from ``stream``: :func:`random_windows`
    draws ``draw`` windows at a time (an optimizer step's batch) with a generator seeded with
    ``seed`` on the stream's device, and the pairs come out one by one in that order. A
    DataLoader of batch size ``draw`` thus yields exactly the batches ``random_windows`` gives; one
    of batch size ``draw / k`` yields each of them as k consecutive micro-batches (gradient
    accumulation); under ``split_batches`` each process keeps its slice of every batch."""

    def __init__(self, stream: torch.Tensor, length: int, draw: int, seed: int) -> None:
        super().__init__()
        if stream.numel() < length + 2:
            raise ValueError(f"the training stream has {stream.numel()} tokens: fewer than one window of {length + 1}")
        self.stream, self.length, self.draw, self.seed = stream, length, draw, seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Named draws, not generator: accelerate would broadcast an attribute called generator.
        draws = torch.Generator(device=self.stream.device).manual_seed(self.seed)
        while True:
            inputs, targets = random_windows(self.stream, self.draw, self.length, draws)
            yield from zip(inputs, targets)


@torch.no_grad()
def perplexity(model: Decoder, stream: torch.Tensor, length: int, max_tokens: int, batch: int = 32, accelerator: Any = None) -> float:
    """exp(mean next-token loss) over consecutive windows of ``length`` covering the first
    ``max_tokens`` tokens of ``stream`` (each window predicts its own last ``length`` tokens).

    ``model`` is a plain Decoder (``accelerator.unwrap_model`` of a prepared one). With an
    ``accelerator`` of several processes each takes a contiguous share of the windows and the
    loss sums are added over the processes; every process must call it."""
    model.eval()
    device = next(model.parameters()).device
    n = min(max_tokens, stream.numel() - 1) // length
    if n < 1:
        raise ValueError(f"the stream has {stream.numel()} tokens: fewer than one window of {length + 1}")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    first, last = n * rank // world, n * (rank + 1) // world
    windows = stream[: n * length + 1].to(device)
    total, count = 0.0, 0
    for i in range(first, last, batch):
        idx = torch.arange(i, min(last, i + batch), device=device)[:, None] * length + torch.arange(length + 1, device=device)
        w = windows[idx]
        with _autocast(device):
            logits = model(w[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
        total, count = total + float(loss), count + w[:, 1:].numel()
    if world > 1:
        sums = accelerator.reduce(torch.tensor([total, count], dtype=torch.float64, device=accelerator.device), "sum")
        total, count = float(sums[0]), float(sums[1])
    return math.exp(total / count)


# --------------------------------------------------------------------------- schedule


def stage2_step(preset: LMPreset) -> int | None:
    """The first step of the two-stage schedule's second stage (None: ``two_stage`` off)."""
    return round(preset.stage2_start * preset.steps) if preset.two_stage else None


def learning_rate(step: int, peak: float, preset: LMPreset) -> float:
    """The learning rate at 0-based ``step``: linear warm-up to ``peak``, then cosine decay to
    ``min_lr_ratio * peak`` at the last step.

    With ``two_stage`` (BitNet b1.58's recipe), from :func:`stage2_step` on the same cosine times
    ``stage2_lr_ratio``: the rate drops at once, then decays on the same curve from a lower peak.
    The recipe is in S. Ma, H. Wang, F. Wei, "The Era of 1-bit LLMs: Training Tips, Code and FAQ"
    (github.com/microsoft/unilm, bitnet/, 2024): a high peak learning rate first, decayed midway
    through training, and weight decay switched off in the second stage. Its numbers, as BitNet
    a4.8 (arXiv 2411.04965, Table 7) lists them for the same recipe: peak 1.5e-3 -> 1e-3 at 700M
    and 1.2e-3 -> 8e-4 at 1.3B (stage-2 peak 2/3 of stage 1's, this preset's default), weight
    decay 0.1 -> 0, 375 warm-up steps, Adam (0.9, 0.95). The BitNet b1.58 2B4T report (arXiv
    2504.12285, section 3.1) gives the shape: stage 1 a cosine from a relatively high peak; about
    midway the rate "abruptly decayed and subsequently maintained via a cosine schedule with a
    significantly lower peak value". (Its stage-1 weight decay follows a cosine up to 0.1; here
    it stays at ``weight_decay`` until the second stage.)
    """
    if step < preset.warmup_steps:
        rate = peak * (step + 1) / preset.warmup_steps
    else:
        progress = (step - preset.warmup_steps) / max(1, preset.steps - preset.warmup_steps)
        low = preset.min_lr_ratio * peak
        rate = low + 0.5 * (peak - low) * (1 + math.cos(math.pi * progress))
    second = stage2_step(preset)
    return rate * preset.stage2_lr_ratio if second is not None and step >= second else rate


def weight_decay(step: int, preset: LMPreset) -> float:
    """The weight decay of the matrices at 0-based ``step``: ``weight_decay``, then
    ``stage2_weight_decay`` from the two-stage schedule's second stage (see :func:`learning_rate`)."""
    second = stage2_step(preset)
    return preset.stage2_weight_decay if second is not None and step >= second else preset.weight_decay


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.95); matrices decay (group 0), norms do not (group 1)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def _set_schedule(optimizer: torch.optim.Optimizer, step: int, peak: float, preset: LMPreset) -> None:
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, peak, preset)
    optimizer.param_groups[0]["weight_decay"] = weight_decay(step, preset)


# --------------------------------------------------------------------------- processes


def launched_processes() -> tuple[int, int]:
    """(this process's rank, number of processes) as ``accelerate launch`` or ``torchrun`` set
    them in the environment; (0, 1) for a plain ``python`` run."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(device: torch.device, grad_accum_steps: int = 1):
    """An ``accelerate.Accelerator`` for :func:`train_row`: on the CPU for a CPU ``device`` (else
    the visible GPU, or the launched processes' devices), batches split across the processes
    (each draws the same windows, no process sends batches to another), mixed precision left to
    the trainer's own bf16 autocast, ``grad_accum_steps`` micro-batches per optimizer step."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    loaders = DataLoaderConfiguration(split_batches=True, dispatch_batches=False)
    return Accelerator(cpu=device.type == "cpu", gradient_accumulation_steps=grad_accum_steps, dataloader_config=loaders)


# --------------------------------------------------------------------------- train


def train_row(row: str, preset: LMPreset, out: Path, tokenizer, reviews: Reviews, device: torch.device, quiet: bool) -> dict:
    """Train one decoder on ``accelerate``; write its weights and ``train_<row>.json`` (main
    process); return the result (every process).

    ``device``: its type picks CPU or GPU; the accelerator places each process (one process:
    the first visible GPU). Raises ValueError when a micro-batch (``batch_size /
    grad_accum_steps``) does not split evenly over the processes."""
    accelerator = make_accelerator(device, preset.grad_accum_steps)
    device, main = accelerator.device, accelerator.is_main_process
    micro_batch = preset.batch_size // preset.grad_accum_steps
    if micro_batch % accelerator.num_processes:
        raise ValueError(f"a micro-batch of {micro_batch} windows (batch_size / grad_accum_steps) does not split "
                         f"over {accelerator.num_processes} processes")  # fmt: skip
    torch.manual_seed(preset.seed)
    config = row_config(row, preset, tokenizer.get_vocab_size())
    model = Decoder(config, seed=preset.seed).to(device)
    peak = preset.lr_fp if config.quant == "fp" else preset.lr_bitnet
    optimizer = _optimizer(model, peak, preset.weight_decay, device)
    train = token_stream(tokenizer, reviews.train).to(device)
    holdout = token_stream(tokenizer, reviews.holdout)
    test = token_stream(tokenizer, reviews.test)
    # The same windows for every row, number of processes and of micro-batches.
    loader = torch.utils.data.DataLoader(WindowDraws(train, preset.seq_len, preset.batch_size, preset.seed), batch_size=micro_batch)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    plain = accelerator.unwrap_model(model)
    batches = iter(loader)
    history, start, running = [], time.perf_counter(), []
    for step in _progress(range(preset.steps), quiet or not main, desc=row):
        model.train()
        _set_schedule(optimizer, step, peak, preset)
        for _ in range(preset.grad_accum_steps):
            x, y = next(batches)
            with accelerator.accumulate(model):
                with _autocast(device):
                    logits = model(x)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            running.append(loss.detach())
        if (step + 1) % preset.eval_every == 0 or step + 1 == preset.steps:
            train_loss = float(accelerator.reduce(torch.stack(running).mean(), "mean"))
            running = []
            hold_ppl = perplexity(plain, holdout, preset.seq_len, preset.eval_tokens, accelerator=accelerator)
            history.append({"step": step + 1, "tokens": (step + 1) * preset.batch_size * preset.seq_len,
                            "train_loss": train_loss, "holdout_ppl": hold_ppl})  # fmt: skip
            if main:
                # The curve so far, on disk: a run killed later (a lent GPU taken back) keeps it.
                write_json(out / f"progress_{row}.json", {"row": row, "lr": peak, "history": history})
                if not quiet:
                    print(f"[{row}] step {step + 1}: train loss {train_loss:.3f}, holdout ppl {hold_ppl:.2f}", flush=True)
    seconds = time.perf_counter() - start
    # On the training device, before saving: 2026-12-01's BitNet rows at sizes m and l spent their
    # last GPU minutes evaluating this on the host CPU, after a save had moved the model there.
    test_ppl = perplexity(plain, test, preset.seq_len, preset.eval_tokens, accelerator=accelerator)
    if main:
        save_row(plain, out, row)
    accelerator.wait_for_everyone()
    weights = weights_path(out, row)
    result = {
        "row": row, "config": config.to_dict(), "preset": asdict(preset), "lr": peak,
        "parameters": plain.num_parameters(), "non_embedding_parameters": plain.num_parameters(embeddings=False),
        "train_tokens_available": int(train.numel()), "tokens_seen": preset.steps * preset.batch_size * preset.seq_len,
        "processes": accelerator.num_processes, "history": history, "holdout_ppl": history[-1]["holdout_ppl"],
        "test_ppl": test_ppl, "train_seconds": seconds, "weights_file": weights.name,
        "weights_bytes": weights.stat().st_size, "provenance": _provenance(device),
    }  # fmt: skip
    if config.quant != "fp":
        # What a reader downloads: the packed file loaded back (fp16 embedding), same test text.
        loaded = load_row(out, row, preset, tokenizer.get_vocab_size()).to(device)
        result["test_ppl_packed"] = perplexity(loaded, test, preset.seq_len, preset.eval_tokens, accelerator=accelerator)
    if main:
        write_json(out / f"train_{row}.json", result)
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # the accelerator let go of the model: the next row starts clean
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


# --------------------------------------------------------------------------- a row's weights file


def weights_path(out: str | Path, row: str) -> Path:
    """Where a row's weights live in ``out``: ``<row>.safetensors`` (fp) or ``<row>.packed`` (ternary)."""
    return Path(out) / (f"{row}.safetensors" if row.startswith("fp-") else f"{row}.packed")


def save_row(model: Decoder, out: str | Path, row: str) -> Path:
    """Write a trained row's weights into ``out`` (:func:`weights_path`): safetensors, float32, for
    full precision; a packed file (2-bit ternary codes, fp16 embedding) for ternary rows. The
    caller's model stays where it is (a copy goes to the CPU). Returns the path."""
    from labutils.packfile import save_packed

    model = copy.deepcopy(model).float().cpu().eval()
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
