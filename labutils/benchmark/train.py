"""The train stage: the FP32 teacher fine-tuned on IMDb, distilled into the packed students.

The INT8 row (torch's dynamic quantization of the teacher, a CPU-only format) is evaluated on
the CPU, in a subprocess that runs while the GPU trains the students."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from labutils.benchmark.checkpoints import (
    int8_dynamic,
    latent_file,
    load_student,
    load_teacher,
    pack_file,
    require_file,
    row_file,
    save_student,
    student_config,
    teacher_file,
    teacher_skeleton,
)
from labutils.benchmark.onnx_runtime import OnnxModel, export_onnx
from labutils.benchmark.preset import ROWS, Preset, check_rows
from labutils.bitlinear import quantize_, quantize_embeddings_
from labutils.runs import device_name, provenance, save_safetensors, write_json
from labutils.stats import encode_predictions


@dataclass
class Splits:
    """Tokenized train / val / test datasets (torch format: input_ids, attention_mask, label)."""

    train: Any
    val: Any
    test: Any


def load_splits(preset: Preset, tokenizer: Any) -> Splits:
    """IMDb for ``preset``: a seeded ``val_size`` hold-out of the training split, the test split
    (first ``test_size`` reviews of a seeded shuffle, or all in file order: ``test_order``),
    tokenized to ``max_length``."""
    from labutils.data import ENV_DATA_DIR, DataSourceError, load_imdb, tokenize_imdb

    train = load_imdb("train", source=preset.data_source, seed=preset.seed, shuffle=True)
    # The whole test split stays in file order, so that every run's per-review predictions line
    # up with every other's (labutils.stats.mcnemar); a subset is a seeded draw.
    test = load_imdb("test", source=preset.data_source, seed=preset.seed, shuffle=preset.test_size is not None)
    if preset.train_size is None and "'sample'" in train.info.description:
        raise DataSourceError(
            f"preset {preset.name!r} needs the full IMDb, but only the embedded sample is reachable: "
            f"set {ENV_DATA_DIR} to a folder with train.parquet and test.parquet, or go online "
            f"(the Hugging Face Hub's stanfordnlp/imdb)"
        )
    n_train = len(train) - preset.val_size if preset.train_size is None else preset.train_size
    if n_train < 1 or n_train + preset.val_size > len(train):
        raise ValueError(
            f"train_size {preset.train_size} + val_size {preset.val_size} exceed the {len(train)} "
            f"training reviews of source {preset.data_source!r}"
        )
    if preset.test_size is not None:
        if preset.test_size > len(test):
            raise ValueError(f"test_size {preset.test_size} exceeds the {len(test)} test reviews")
        test = test.select(range(preset.test_size))
    val = train.select(range(n_train, n_train + preset.val_size))
    train = train.select(range(n_train))
    tok = lambda ds: tokenize_imdb(ds, tokenizer, preset.max_length)
    return Splits(tok(train), tok(val), tok(test))


def _loader(dataset: Any, batch_size: int, shuffle: bool, seed: int) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


TEST_LABELS = "test_labels.json"  # the test labels in test order, beside the teacher's train JSON


def test_order(preset: Preset) -> str:
    """The order ``load_splits`` gives the test reviews in (stored beside every run's predictions)."""
    return "file" if preset.test_size is None else f"first {preset.test_size} of a shuffle with seed {preset.seed}"


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[Mapping[str, torch.Tensor]], device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """The argmax predictions and the labels of every review of ``loader``, in its order: two
    uint8 ``[n]`` arrays (model in eval mode)."""
    model.eval()
    predictions, labels = [], []
    for batch in loader:
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        predictions.append(logits.argmax(-1).cpu().numpy().astype(np.uint8))
        labels.append(batch["label"].numpy().astype(np.uint8))
    if not predictions:
        raise ValueError("the evaluation loader yielded no reviews")
    return np.concatenate(predictions), np.concatenate(labels)


def accuracy(model: nn.Module, loader: Iterable[Mapping[str, torch.Tensor]], device: torch.device) -> float:
    """Fraction of reviews whose argmax logit equals the label (model in eval mode, float32)."""
    predictions, labels = predict(model, loader, device)
    return float((predictions == labels).mean())


def scored(model: nn.Module, loader: Iterable[Mapping[str, torch.Tensor]], device: torch.device, order: str) -> dict[str, Any]:
    """``{"accuracy", "test_predictions"}``: the accuracy and the predictions themselves
    (``labutils.stats.encode_predictions``, in ``order``) for paired tests between runs."""
    predictions, labels = predict(model, loader, device)
    return {"accuracy": float((predictions == labels).mean()), "test_predictions": encode_predictions(predictions, labels, order)}


def augmented_train_set(preset: Preset, train: Any, model: nn.Module, tokenizer: Any) -> Any:
    """The training reviews plus ``preset.augment_copies`` copies of each with words swapped for
    their neighbours in ``model``'s input embeddings (``labutils.augment``; TinyBERT's recipe
    with ``augment_prob`` and ``augment_neighbours``); the copies keep their reviews' labels."""
    from labutils.augment import AugmentedReviews, augment_ids, continuation_pieces, embedding_neighbours, whole_words

    if preset.augment_copies == 0:
        return train
    words, pieces = whole_words(tokenizer), continuation_pieces(tokenizer)
    embeddings = model.get_input_embeddings().weight.detach().cpu()
    words, pieces = words[: embeddings.shape[0]], pieces[: embeddings.shape[0]]
    neighbours = embedding_neighbours(embeddings, words, k=preset.augment_neighbours)
    rows = train[:]
    copies = [AugmentedReviews(augment_ids(rows["input_ids"], neighbours, words, pieces, preset.augment_prob,
                                           seed=1000 * preset.seed + c), rows["attention_mask"], rows["label"])
              for c in range(preset.augment_copies)]  # fmt: skip
    return torch.utils.data.ConcatDataset([train, *copies])


def _train_config(preset: Preset, epochs: int, lr: float, quiet: bool, quant_warmup_ratio: float = 0.0):
    from labutils.distill import TrainConfig

    return TrainConfig(
        epochs=epochs,
        lr=lr,
        weight_decay=0.01,
        warmup_ratio=0.06,
        quant_warmup_ratio=quant_warmup_ratio,
        lr_schedule="linear",
        monitor="eval_accuracy",
        restore_best=True,  # the best epoch on the validation hold-out, never on the test set
        seed=preset.seed,
        progress=not quiet,
    )


def _distill_config(preset: Preset):
    from labutils.distill import DistillConfig

    return DistillConfig(
        task_weight=preset.task_weight,
        logit_weight=preset.logit_weight,
        temperature=preset.temperature,
        hidden_weight=preset.hidden_weight,
        attention_weight=preset.attention_weight,
        attention_target=preset.attention_target,
    )


def _accelerator(device: torch.device):
    from accelerate import Accelerator

    if device.type == "cuda":
        return Accelerator(mixed_precision="bf16")
    return Accelerator(cpu=True)


def _train_teacher(preset: Preset, out: Path, splits: Splits, model_path: str | None, device: torch.device, quiet: bool) -> dict:
    from labutils.distill import train

    model = teacher_skeleton(model_path, seed=preset.seed)
    start = time.perf_counter()
    history = train(
        model,
        _loader(splits.train, preset.batch_size, True, preset.seed),
        _loader(splits.val, preset.eval_batch_size, False, preset.seed),
        config=_train_config(preset, preset.teacher_epochs, preset.teacher_lr, quiet),
        accelerator=_accelerator(device),
    )
    seconds = time.perf_counter() - start
    model = model.float().to(device)
    test = scored(model, _loader(splits.test, preset.eval_batch_size, False, 0), device, test_order(preset))
    save_safetensors(model.cpu(), teacher_file(out))
    return {**test, "train_seconds": seconds, "history": list(history)}


def _train_student(
    row: str, preset: Preset, out: Path, splits: Splits, model_path: str | None, device: torch.device, quiet: bool
) -> dict:
    from safetensors.torch import load_model, save_model

    from labutils.distill import train

    teacher, _ = load_teacher(out, model_path, attn="eager")  # eager: attention maps for the KD loss
    student = copy.deepcopy(teacher)
    config = student_config(row, preset)
    quantize_(student, config)
    if preset.embeddings != "float":  # QAT of the embeddings: train with the rounding the file applies
        quantize_embeddings_(student, bits=int(preset.embeddings[3:]), group_size=preset.group_size)
    if preset.student_init != "fp32":  # multi-step distillation: start where a higher-precision student ended
        path = require_file(latent_file(out, preset.student_init), f"student_init={preset.student_init!r}")
        missing, unexpected = load_model(student, str(path), strict=False)
        # a sign_mean student (w1a8, or w1a1 sign_mean) has no elastic α/β: those start fresh
        # (β = 0, α from the first batch, as BiT); every other tensor must be in the file
        missing = [k for k in missing if k.rpartition(".")[2] not in ("act_alpha", "act_beta", "act_alpha_initialized")]
        if missing or unexpected:
            raise RuntimeError(f"{path} does not fit the {row} student: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if preset.student_teacher != "fp32":
        require_file(pack_file(out, preset.student_teacher), f"student_teacher={preset.student_teacher!r}")
        teacher = load_student(out, preset.student_teacher, model_path, attn="eager")
    if preset.augment_copies:
        from labutils.models import load_tokenizer

        splits = replace(splits, train=augmented_train_set(preset, splits.train, teacher, load_tokenizer(model_path)))
    start = time.perf_counter()
    history = train(
        student,
        _loader(splits.train, preset.student_batch_size, True, preset.seed),
        _loader(splits.val, preset.eval_batch_size, False, preset.seed),
        config=_train_config(preset, preset.student_epochs, preset.student_lr, quiet, preset.quant_warmup_ratio),
        teacher=teacher.to(device),
        distill=_distill_config(preset),
        accelerator=_accelerator(device),
    )
    seconds = time.perf_counter() - start
    test = _loader(splits.test, preset.eval_batch_size, False, 0)
    student = student.float().to(device).eval()
    before = accuracy(student, test, device)
    latent_file(out, row).parent.mkdir(parents=True, exist_ok=True)
    tmp = latent_file(out, row).with_suffix(".tmp")  # the next step of a distillation chain starts here
    save_model(student.cpu(), str(tmp))
    os.replace(tmp, latent_file(out, row))
    file_bytes = save_student(student.cpu(), pack_file(out, row), preset)
    reloaded = load_student(out, row, model_path).to(device)
    return {
        **scored(reloaded, test, device, test_order(preset)),  # the shipped file's model, what users get
        "accuracy_before_packing": before,  # float embeddings and heads, same BitLinear weights
        "file_bytes": file_bytes,
        "train_seconds": seconds,
        "history": list(history),
        "bitnet": asdict(config),
    }


CPU_ACCURACY_ROWS = ("int8", "onnx-int8")
"""Rows whose test accuracy the train stage measures on the CPU, from the trained teacher: torch's
dynamic INT8 (runs nowhere else) and ONNX Runtime's (the deployment peer of the CPU stage)."""


def int8_accuracy(preset: Preset, out: Path, model_path: str | None, threads: int, quiet: bool, row: str = "int8") -> dict:
    """The test accuracy of ``row`` (one of ``CPU_ACCURACY_ROWS``), the trained teacher quantized to
    INT8 dynamically, on the CPU: ``{"accuracy", "test_predictions", "eval_seconds", "threads", "device"}``."""
    from labutils.models import load_tokenizer

    if row not in CPU_ACCURACY_ROWS:
        raise ValueError(f"row {row!r}: the CPU accuracy rows are {', '.join(CPU_ACCURACY_ROWS)}")
    torch.set_num_threads(threads)
    teacher, source = load_teacher(out, model_path)
    if source != "trained teacher":
        raise FileNotFoundError(f"the {row} row needs the trained teacher at {teacher_file(out)}")
    splits = load_splits(preset, load_tokenizer(model_path))
    if row == "int8":
        model = int8_dynamic(teacher)
    else:  # the exported files (87 MB) stay in out/onnx for the CPU stage to reuse
        model = OnnxModel(export_onnx(teacher, out / "onnx")[row], threads)
    start = time.perf_counter()
    loader = _loader(splits.test, preset.eval_batch_size, False, 0)
    if not quiet:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc=f"{row} accuracy (CPU)")
    test = scored(model, loader, torch.device("cpu"), test_order(preset))
    return {**test, "eval_seconds": time.perf_counter() - start, "threads": threads, "device": device_name("cpu")}


def spawn_int8(preset_file: Path, out: Path, model_path: str | None, threads: int) -> subprocess.Popen:
    """Evaluate the CPU accuracy rows in a subprocess on ``threads`` CPU cores while the GPU trains:
    torch INT8, and ONNX Runtime INT8 where onnx and onnxruntime are installed."""
    import importlib.util

    rows = ["int8"] + (["onnx-int8"] if all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")) else [])
    cmd = [sys.executable, "-m", "labutils.bench", "imdb", "--stage", "int8", "--preset-file", str(preset_file),
           "--out", str(out), "--threads", str(threads), "--rows", ",".join(rows), "--quiet"]  # fmt: skip
    if model_path:
        cmd += ["--model", str(model_path)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(cmd, env=env)


def run_train(
    preset: Preset,
    out: Path,
    *,
    rows: Sequence[str] = tuple(ROWS),
    model_path: str | None = None,
    device: str = "auto",
    quiet: bool = False,
) -> None:
    """Stage 1: train the teacher and the students of ``rows`` and measure their test accuracy;
    writes ``out/train_<row>.json`` (skipping rows that already have one)."""
    from labutils.models import load_tokenizer

    rows = check_rows(rows)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    prov = provenance(device_name(dev))
    splits = None

    def _splits() -> Splits:
        nonlocal splits
        if splits is None:
            splits = load_splits(preset, load_tokenizer(model_path))
        return splits

    if not row_file(out, "train", "fp32").is_file() or not teacher_file(out).is_file():
        result = _train_teacher(preset, out, _splits(), model_path, dev, quiet)
        write_json(row_file(out, "train", "fp32"), {**result, "provenance": prov})
        labels = np.asarray(_splits().test["label"], dtype=np.uint8)  # what the paired tests score against
        write_json(out / TEST_LABELS, encode_predictions(labels, labels, test_order(preset)))
        print(f"[train] fp32 teacher: test accuracy {result['accuracy']:.4f} ({result['train_seconds']:.0f} s)", flush=True)

    int8_job = None
    if "int8" in rows and not row_file(out, "train", "int8").is_file():
        if dev.type == "cuda":  # the CPU is idle while the GPU trains: evaluate INT8 beside it
            int8_job = spawn_int8(out / "preset.json", out, model_path, max(1, (os.cpu_count() or 2) - 2))
        else:
            result = int8_accuracy(preset, out, model_path, torch.get_num_threads(), quiet)
            write_json(row_file(out, "train", "int8"), {**result, "provenance": provenance(result["device"])})
    for row in rows:
        if ROWS[row].is_student and not row_file(out, "train", row).is_file():
            result = _train_student(row, preset, out, _splits(), model_path, dev, quiet)
            write_json(row_file(out, "train", row), {**result, "provenance": prov})
            print(
                f"[train] {row}: test accuracy {result['accuracy']:.4f} (before packing "
                f"{result['accuracy_before_packing']:.4f}), {result['file_bytes'] / 1e6:.2f} MB, "
                f"{result['train_seconds']:.0f} s",
                flush=True,
            )
    if int8_job is not None and int8_job.wait() != 0:
        raise RuntimeError(f"the INT8 accuracy subprocess failed with exit status {int8_job.returncode}")
