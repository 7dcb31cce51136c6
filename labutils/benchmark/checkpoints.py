"""Where each row's model lives in a run folder, and how it is built, saved and loaded."""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from labutils.benchmark.preset import ROWS, Preset
from labutils.bitlinear import BitNetConfig, quantize_


def teacher_skeleton(model_path: str | None, seed: int = 0, attn: str = "sdpa") -> nn.Module:
    """The classifier architecture (MiniLM + a fresh head), float32, ``attn`` attention."""
    from labutils.models import load_classifier

    return load_classifier(model_path, num_labels=2, seed=seed, attn_implementation=attn)


def student_config(row: str, preset: Preset | None = None, act_binarizer: str | None = None) -> BitNetConfig:
    """``ROWS[row]``'s BitNetConfig, with 1-bit activations made as ``act_binarizer`` says (default:
    ``preset.w1a1_activations``, else the row's own "sign_mean"); rows with multi-bit activations
    are returned as they are."""
    config = ROWS[row].bitnet
    if config is None:
        raise ValueError(f"row {row!r} is not a student (no BitNetConfig)")
    if act_binarizer is None and preset is not None:
        act_binarizer = preset.w1a1_activations
    if config.act_bits == 1 and act_binarizer is not None:
        config = replace(config, act_binarizer=act_binarizer)
    return config


def student_skeleton(
    row: str, model_path: str | None, attn: str = "sdpa", *, act_binarizer: str | None = None
) -> nn.Module:
    """The teacher architecture with every encoder linear replaced by ``student_config(row)``'s BitLinear."""
    model = teacher_skeleton(model_path, attn=attn)
    quantize_(model, student_config(row, act_binarizer=act_binarizer))
    return model.eval()


def _file_act_binarizer(path: Path) -> str:
    """Whether the packed (or latent) file at ``path`` holds BiT's elastic α ("elastic"), else "sign_mean"."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return "elastic" if any(k.endswith(".act_alpha") for k in f.keys()) else "sign_mean"


def int8_dynamic(model: nn.Module) -> nn.Module:
    """torch's dynamic INT8 quantization of every nn.Linear (int8 weights per tensor, activations
    quantized per batch at run time): what a CPU user picks without retraining. CPU only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)


def pack_file(out: Path, row: str) -> Path:
    return out / f"{row}.packed"


def latent_file(out: Path, row: str) -> Path:
    """A trained student's latent (float) weights: where a multi-step distillation continues."""
    return out / "latent" / f"{row}.safetensors"


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} needs {path}: train that row first, in the same --out folder")
    return path


def teacher_file(out: Path) -> Path:
    return out / "teacher" / "model.safetensors"


def load_student(out: Path, row: str, model_path: str | None, attn: str = "sdpa") -> nn.Module:
    """The student of ``row`` loaded back from its packed file in ``out`` (fake-quantized BitLinear)."""
    from labutils.packfile import load_packed

    path = student_file(out, row)  # the file says whether its 1-bit activations are elastic
    return load_packed(path, student_skeleton(row, model_path, attn, act_binarizer=_file_act_binarizer(path)))


def student_file(out: Path, row: str) -> Path:
    """The trained student's packed file, else the untrained stand-in's (see ``write_untrained_student``)."""
    trained = pack_file(out, row)
    return trained if trained.is_file() else out / "untrained" / f"{row}.packed"


def write_untrained_student(out: Path, row: str, model_path: str | None, preset: Preset) -> Path:
    """A stand-in for a student that was not trained here: the pretrained encoder quantized to
    ``row``'s BitLinear (no QAT), packed exactly like a trained one. Its accuracy means nothing, but
    its file size, latency and memory are those of the trained student: none of them depends on
    the weights' values. Written to ``out/untrained/<row>.packed``."""
    model = teacher_skeleton(model_path)
    quantize_(model, student_config(row, preset))
    path = out / "untrained" / f"{row}.packed"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_student(model, path, preset)
    return path


def save_student(model: nn.Module, path: Path, preset: Preset) -> int:
    """Write a student as the preset packs it (linears, embeddings, floats); return its bytes."""
    from labutils.packfile import save_packed

    return save_packed(model, path, ternary=preset.ternary, embeddings=preset.embeddings,
                       group_size=preset.group_size, float_dtype=preset.float_dtype)  # fmt: skip


def load_teacher(out: Path, model_path: str | None, attn: str = "sdpa") -> tuple[nn.Module, str]:
    """(teacher, where its weights came from): the trained teacher from ``out`` when present, else
    the architecture with the pretrained encoder (latency, memory and file size do not depend on
    the weights' values, so the CPU stage can run where the teacher's file did not travel)."""
    from safetensors.torch import load_model

    model = teacher_skeleton(model_path, attn=attn)
    path = teacher_file(out)
    if path.is_file():
        load_model(model, str(path))
        return model.eval(), "trained teacher"
    return model.eval(), "pretrained encoder, new head (the trained teacher's file was not here)"


def row_file(out: Path, stage: str, row: str) -> Path:
    """The JSON a stage writes for one row: ``out/<stage>_<row>.json``."""
    return out / f"{stage}_{row}.json"
