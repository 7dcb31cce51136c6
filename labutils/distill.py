"""Knowledge distillation losses and the one training loop of the book.

A quantized student learns from a full-precision teacher (Hinton et al., 2015; TernaryBERT,
Zhang et al., 2020; BinaryBERT, Bai et al., 2021) through a weighted sum of

- ``task``: cross-entropy with the labels;
- ``logits``: soft-target KL at temperature T, ``T² · KL(softmax(z_t/T) || softmax(z_s/T))``
  (the T² keeps its gradient on the scale of the task loss as T grows);
- ``hidden``: MSE between hidden states, student layer i against teacher layer ``layer_map[i]``
  (the embedding outputs are matched too);
- ``attention``: MSE between attention maps of mapped layers, on probabilities or on scores.

``train`` runs teacher fine-tuning, QAT and distillation alike, on Hugging Face ``accelerate``:
the same call trains on one CPU, one GPU, or several GPUs under ``accelerate launch`` (DDP). It
takes Hugging Face models (batches are dicts with input_ids, attention_mask, labels; outputs
have .logits, .hidden_states, .attentions) and plain torch models (batches are (x, y); the
model returns logits). Hidden states and attentions are requested only when a loss needs them;
attention maps need ``attn_implementation="eager"`` in transformers 5. Checkpoints are
safetensors plus JSON, never pickle.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from labutils.bitlinear import bitlinear_layers, linear_warmup_lambda, set_quant_strength

__all__ = [
    "DistillConfig",
    "TrainConfig",
    "ModelOutputs",
    "History",
    "soft_target_kl",
    "uniform_layer_map",
    "hidden_state_mse",
    "attention_mse",
    "distillation_loss",
    "unpack_outputs",
    "evaluate",
    "train",
    "restored_epoch",
    "save_checkpoint",
    "load_checkpoint",
]

ATTENTION_TARGETS = ("probs", "scores", "kl")
MONITORS = {"eval_accuracy": "max", "eval_loss": "min", "train_loss": "min"}


# --------------------------------------------------------------------------- configs


def _non_negative(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class DistillConfig:
    """Weights of the loss terms: ``task·CE + logits·T²KL + hidden·MSE_h + attention·MSE_a``.

    Attributes:
        task_weight: weight of the cross-entropy with the labels.
        logit_weight: weight of the soft-target KL.
        temperature: T of the soft targets (> 0).
        hidden_weight: weight of the hidden-state MSE.
        attention_weight: weight of the attention MSE.
        attention_target: "probs" (MSE of the attention probabilities), "scores" (MSE of the
            pre-softmax scores, TernaryBERT; recovered from the probabilities up to the per-row
            constant that softmax ignores) or "kl" (KL(teacher || student) of every query's
            attention distribution, MiniLM's self-attention transfer; unlike the MSE of
            probabilities it does not shrink as 1/L², and unlike recovered scores it ignores
            keys the teacher gives ~0 probability).
        layer_map: student layer i (0-based) learns from teacher layer ``layer_map[i]``; None
            maps the layers uniformly (``uniform_layer_map``).
    """

    task_weight: float = 1.0
    logit_weight: float = 0.0
    temperature: float = 1.0
    hidden_weight: float = 0.0
    attention_weight: float = 0.0
    attention_target: str = "probs"
    layer_map: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("task_weight", "logit_weight", "hidden_weight", "attention_weight"):
            _non_negative(getattr(self, name), name)
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, numbers.Real)
            or not (0 < self.temperature < math.inf)
        ):
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}")
        if self.attention_target not in ATTENTION_TARGETS:
            raise ValueError(
                f"attention_target must be one of {ATTENTION_TARGETS}, got {self.attention_target!r}"
            )
        if self.layer_map is not None:
            object.__setattr__(self, "layer_map", tuple(self.layer_map))
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.layer_map):
                raise ValueError(f"layer_map must hold teacher layer indices >= 0, got {self.layer_map!r}")
        if self.task_weight + self.logit_weight + self.hidden_weight + self.attention_weight == 0:
            raise ValueError("all loss weights are 0: set at least one of task/logit/hidden/attention_weight")

    @property
    def needs_teacher(self) -> bool:
        return self.logit_weight > 0 or self.hidden_weight > 0 or self.attention_weight > 0

    @property
    def needs_hidden_states(self) -> bool:
        return self.hidden_weight > 0

    @property
    def needs_attentions(self) -> bool:
        return self.attention_weight > 0


@dataclass(frozen=True)
class TrainConfig:
    """Settings of ``train``.

    Attributes:
        epochs: passes over the training data.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay, applied to matrices only (not biases or norms).
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        lr_schedule: a ``transformers.get_scheduler`` name: "linear", "cosine", "constant",
            "constant_with_warmup", ...
        warmup_ratio: fraction of the steps with a linear learning-rate warm-up from 0.
        quant_warmup_ratio: fraction of the steps over which the BitLinear layers' λ goes
            linearly from 0 (full precision) to 1 (quantized); 0 = quantized from the start.
        early_stopping_patience: stop after this many epochs without improving ``monitor``
            (None: never; needs an eval loader when monitor is an eval metric).
        monitor: "eval_accuracy" (higher is better), "eval_loss" or "train_loss" (lower).
        restore_best: at the end, load the weights of the best epoch by ``monitor``.
        checkpoint_dir: if set, save ``last/`` every epoch and ``best/`` on improvement
            (model.safetensors + trainer_state.json).
        seed: seeds python, numpy and torch (``accelerate.utils.set_seed``) before training.
        progress: show a tqdm bar per epoch (main process only).
    """

    epochs: int = 3
    lr: float = 5e-5
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    lr_schedule: str = "linear"
    warmup_ratio: float = 0.0
    quant_warmup_ratio: float = 0.0
    early_stopping_patience: int | None = None
    monitor: str = "eval_accuracy"
    restore_best: bool = True
    checkpoint_dir: str | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {self.epochs!r}")
        _non_negative(self.lr, "lr")
        _non_negative(self.weight_decay, "weight_decay")
        if self.max_grad_norm is not None and not (
            isinstance(self.max_grad_norm, numbers.Real) and self.max_grad_norm > 0
        ):
            raise ValueError(f"max_grad_norm must be a positive number or None, got {self.max_grad_norm!r}")
        for name in ("warmup_ratio", "quant_warmup_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        patience = self.early_stopping_patience
        if patience is not None and (
            isinstance(patience, bool) or not isinstance(patience, int) or patience < 1
        ):
            raise ValueError(f"early_stopping_patience must be a positive int or None, got {patience!r}")
        if self.monitor not in MONITORS:
            raise ValueError(f"monitor must be one of {tuple(MONITORS)}, got {self.monitor!r}")


# --------------------------------------------------------------------------- losses


class ModelOutputs(NamedTuple):
    """What the losses read from a forward pass.

    logits: [B, C] (or [B, L, C]). hidden_states: None or a sequence of [B, L, H], embeddings
    first then one per layer (Hugging Face layout). attentions: None or a sequence of
    [B, heads, L, L] attention probabilities, one per layer.
    """

    logits: torch.Tensor
    hidden_states: Sequence[torch.Tensor] | None = None
    attentions: Sequence[torch.Tensor] | None = None


def unpack_outputs(outputs: Any) -> ModelOutputs:
    """ModelOutputs from a Hugging Face output (.logits ...), a logits tensor, or a tuple (logits, ...)."""
    if isinstance(outputs, ModelOutputs):
        return outputs
    if isinstance(outputs, torch.Tensor):
        return ModelOutputs(outputs)
    if hasattr(outputs, "logits"):
        return ModelOutputs(
            outputs.logits,
            getattr(outputs, "hidden_states", None) or None,
            getattr(outputs, "attentions", None) or None,
        )
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return ModelOutputs(outputs[0])
    raise TypeError(
        f"model outputs must be a logits tensor or have .logits (Hugging Face), got {type(outputs).__name__}"
    )


def soft_target_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``T² · KL(softmax(z_t/T) || softmax(z_s/T))``, averaged over the examples.

    Args:
        student_logits, teacher_logits: float [..., C], same shape (every leading index is
            one example).
        temperature: T > 0.

    Returns:
        scalar float tensor (differentiable w.r.t. the student logits).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def uniform_layer_map(n_student: int, n_teacher: int) -> tuple[int, ...]:
    """Student layer i learns from teacher layer ``(i + 1)·n_teacher // n_student - 1`` (TinyBERT's
    uniform strategy: the last student layer meets the last teacher layer). 0-based indices."""
    if n_student < 1 or n_teacher < n_student:
        raise ValueError(
            f"need 1 <= n_student <= n_teacher, got n_student={n_student}, n_teacher={n_teacher}"
        )
    return tuple((i + 1) * n_teacher // n_student - 1 for i in range(n_student))


def _layer_pairs(n_student: int, n_teacher: int, layer_map: Sequence[int] | None) -> list[tuple[int, int]]:
    layer_map = uniform_layer_map(n_student, n_teacher) if layer_map is None else tuple(layer_map)
    if len(layer_map) != n_student:
        raise ValueError(f"layer_map must have one entry per student layer ({n_student}), got {layer_map}")
    if any(not 0 <= t < n_teacher for t in layer_map):
        raise ValueError(f"layer_map entries must be teacher layers in [0, {n_teacher - 1}], got {layer_map}")
    return list(enumerate(layer_map))


def _masked_mean(err: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``err`` weighted by a broadcastable 0/1 ``weight`` (plain mean when None)."""
    if weight is None:
        return err.mean()
    weight = weight.to(err.dtype).expand_as(err)
    return (err * weight).sum() / weight.sum().clamp_min(1)


def hidden_state_mse(
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    layer_map: Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over mapped layers of ``MSE(h_student, h_teacher)`` (TernaryBERT's hidden loss).

    Args:
        student_hidden: 1 + Ls tensors [B, L, H] (embeddings, then each layer), HF layout.
        teacher_hidden: 1 + Lt tensors [B, L, H] (same H: no projection is learned).
        layer_map: Ls teacher layer indices (0-based, over layers, not embeddings); None = uniform.
        attention_mask: optional [B, L] 1/0; padding tokens are left out of the mean.

    Returns:
        scalar float tensor. Embeddings are matched with embeddings, layer i with layer_map[i].
    """
    pairs = [(0, 0)] + [
        (s + 1, t + 1) for s, t in _layer_pairs(len(student_hidden) - 1, len(teacher_hidden) - 1, layer_map)
    ]
    mask = None if attention_mask is None else attention_mask[:, :, None]
    losses = []
    for s, t in pairs:
        hs, ht = student_hidden[s], teacher_hidden[t]
        if hs.shape != ht.shape:
            raise ValueError(
                f"student hidden state {s} has shape {tuple(hs.shape)} but teacher hidden state {t} "
                f"has shape {tuple(ht.shape)}; hidden distillation needs equal hidden sizes"
            )
        losses.append(_masked_mean((hs.float() - ht.float()) ** 2, mask))
    return torch.stack(losses).mean()


def _attention_scores(probs: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Pre-softmax scores from probabilities [B, h, Lq, Lk], centered over the valid keys.

    softmax(s) = softmax(s + c) for any per-row c, so log p = s - logsumexp(s) is s up to a
    per-row constant; centering removes it: the result is s minus its mean over valid keys.
    """
    log_p = probs.float().clamp_min(1e-12).log() * key_mask
    row_mean = log_p.sum(-1, keepdim=True) / key_mask.sum(-1, keepdim=True).clamp_min(1)
    return (log_p - row_mean) * key_mask


def _attention_kl(
    student: torch.Tensor, teacher: torch.Tensor, key_mask: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Mean over valid queries (all heads) of sum_k p_t log(p_t / p_s), keys masked; [B, h, L, L] in."""
    p_t, p_s = teacher.float(), student.float()
    terms = torch.xlogy(p_t, p_t) - p_t * p_s.clamp_min(1e-12).log()  # 0·log 0 = 0
    per_query = (terms * key_mask).sum(-1)  # [B, h, L]
    if attention_mask is None:
        return per_query.mean()
    query_mask = attention_mask.to(torch.float32)[:, None, :].expand_as(per_query)
    return (per_query * query_mask).sum() / query_mask.sum().clamp_min(1)


def attention_mse(
    student_attentions: Sequence[torch.Tensor],
    teacher_attentions: Sequence[torch.Tensor],
    layer_map: Sequence[int] | None = None,
    *,
    target: str = "probs",
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over mapped layers of the MSE between attention maps (TernaryBERT / BinaryBERT).

    Args:
        student_attentions: Ls tensors [B, heads, L, L] of attention probabilities.
        teacher_attentions: Lt tensors [B, heads, L, L] (same number of heads).
        layer_map: Ls teacher layer indices (0-based); None = uniform.
        target: "probs" (MSE of the probabilities), "scores" (MSE of the scores, recovered
            up to softmax's per-row constant and centered over the valid keys) or "kl" (the
            mean over valid queries of KL(teacher row || student row), summed over keys).
        attention_mask: optional [B, L] 1/0; pairs with a padding query or key are left out.

    Returns:
        scalar float tensor.
    """
    if target not in ATTENTION_TARGETS:
        raise ValueError(f"target must be one of {ATTENTION_TARGETS}, got {target!r}")
    losses = []
    for s, t in _layer_pairs(len(student_attentions), len(teacher_attentions), layer_map):
        a_s, a_t = student_attentions[s], teacher_attentions[t]
        if a_s.shape != a_t.shape:
            raise ValueError(
                f"student attention {s} has shape {tuple(a_s.shape)} but teacher attention {t} has "
                f"shape {tuple(a_t.shape)}; attention distillation needs equal heads and lengths"
            )
        if attention_mask is None:
            key_mask = torch.ones_like(a_s[..., :1, :], dtype=torch.float32)
            pair_mask = None
        else:
            valid = attention_mask.to(torch.float32)
            key_mask = valid[:, None, None, :]
            pair_mask = valid[:, None, :, None] * key_mask
        if target == "kl":
            losses.append(_attention_kl(a_s, a_t, key_mask, attention_mask))
            continue
        if target == "scores":
            a_s, a_t = _attention_scores(a_s, key_mask), _attention_scores(a_t, key_mask)
        losses.append(_masked_mean((a_s.float() - a_t.float()) ** 2, pair_mask))
    return torch.stack(losses).mean()


def distillation_loss(
    student: ModelOutputs,
    teacher: ModelOutputs | None,
    labels: torch.Tensor | None,
    config: DistillConfig,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum of the terms of ``config`` whose weight is not 0.

    Args:
        student: the student's ModelOutputs (hidden states / attentions where needed).
        teacher: the teacher's ModelOutputs, or None when ``config`` uses no teacher term.
        labels: int64 [B] class labels (or [B, L] with -100 ignored); needed when task_weight > 0.
        config: the DistillConfig.
        attention_mask: optional [B, L] padding mask for the hidden and attention terms.

    Returns:
        (total scalar loss, {"task"|"logits"|"hidden"|"attention": unweighted scalar term}).
    """
    parts: dict[str, torch.Tensor] = {}
    if config.task_weight > 0:
        if labels is None:
            raise ValueError("task_weight > 0 needs labels, got labels=None")
        parts["task"] = F.cross_entropy(student.logits.float().flatten(0, -2), labels.flatten())
    if config.needs_teacher and teacher is None:
        raise ValueError(
            "this DistillConfig has teacher terms (logit/hidden/attention weight > 0) but teacher is None"
        )
    if config.logit_weight > 0:
        parts["logits"] = soft_target_kl(student.logits, teacher.logits, config.temperature)
    if config.hidden_weight > 0:
        for who, out in (("student", student), ("teacher", teacher)):
            if not out.hidden_states:
                raise ValueError(
                    f"hidden_weight > 0 needs the {who}'s hidden_states (output_hidden_states=True)"
                )
        parts["hidden"] = hidden_state_mse(
            student.hidden_states, teacher.hidden_states, config.layer_map, attention_mask
        )
    if config.attention_weight > 0:
        for who, out in (("student", student), ("teacher", teacher)):
            if not out.attentions:
                raise ValueError(
                    f"attention_weight > 0 needs the {who}'s attentions: build the model with "
                    f'attn_implementation="eager" (sdpa/flash attention return none in transformers 5)'
                )
        parts["attention"] = attention_mse(
            student.attentions,
            teacher.attentions,
            config.layer_map,
            target=config.attention_target,
            attention_mask=attention_mask,
        )
    weights = {
        "task": config.task_weight,
        "logits": config.logit_weight,
        "hidden": config.hidden_weight,
        "attention": config.attention_weight,
    }
    total = sum(weights[name] * value for name, value in parts.items())
    return total, parts


# --------------------------------------------------------------------------- batches and forward


def _split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """(model inputs, labels) from a dict batch (HF: labels under "labels" or "label") or (x, y)."""
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "label")}
        return inputs, batch.get("labels", batch.get("label"))
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"a batch must be a dict (input_ids, attention_mask, labels) or a pair (x, y), got {type(batch).__name__}"
    )


def _forward(model: nn.Module, inputs: Any, config: DistillConfig) -> ModelOutputs:
    """Run ``model``; ask a Hugging Face model for hidden states / attentions only when needed."""
    if isinstance(inputs, Mapping):
        extra = {}
        if config.needs_hidden_states:
            extra["output_hidden_states"] = True
        if config.needs_attentions:
            extra["output_attentions"] = True
        return unpack_outputs(model(**inputs, **extra))
    return unpack_outputs(model(inputs))


# --------------------------------------------------------------------------- history


class History(list):
    """One dict per epoch (``epoch``, ``train_loss``, ``train_<term>``, ``eval_loss``,
    ``eval_accuracy``, ``lr``, ``quant_strength``); a list, so ``pandas.DataFrame(history)`` works."""

    def series(self, key: str) -> list:
        """The values of ``key`` over the epochs (None where an epoch lacks it)."""
        return [row.get(key) for row in self]

    def best(self, key: str = "eval_accuracy") -> dict:
        """The epoch with the best ``key`` (max for accuracy, min for losses)."""
        rows = [row for row in self if row.get(key) is not None]
        if not rows:
            raise ValueError(f"no epoch has {key!r}; keys: {sorted(self[0]) if self else []}")
        pick = max if "accuracy" in key else min
        return pick(rows, key=lambda row: row[key])

    def plot(self, *keys: str):
        """A plotly figure of ``keys`` (default: the losses and the accuracy) against the epoch."""
        import plotly.graph_objects as go

        keys = keys or tuple(
            k for k in ("train_loss", "eval_loss", "eval_accuracy") if any(k in r for r in self)
        )
        fig = go.Figure(
            [go.Scatter(x=self.series("epoch"), y=self.series(k), name=k, mode="lines+markers") for k in keys]
        )
        fig.update_layout(xaxis_title="epoch", template="plotly_white")
        return fig


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, accelerator: Any = None) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``loader`` (all processes' examples).

    Args:
        model: a classifier (HF or plain torch), logits [B, C].
        loader: batches as for ``train``.
        accelerator: an ``accelerate.Accelerator`` to gather across processes (None: local).

    Returns:
        {"loss": float, "accuracy": float in [0, 1]}.
    """
    was_training = model.training
    model.eval()
    losses, correct = [], []
    for batch in loader:
        inputs, labels = _split_batch(batch)
        logits = _forward(model, inputs, DistillConfig()).logits.float()
        loss = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none")
        hit = (logits.argmax(-1) == labels).flatten().float()
        if accelerator is not None:
            loss, hit = accelerator.gather_for_metrics((loss, hit))
        losses.append(loss)
        correct.append(hit)
    model.train(was_training)
    if not losses:
        raise ValueError("the eval loader yielded no batches")
    return {"loss": float(torch.cat(losses).mean()), "accuracy": float(torch.cat(correct).mean())}


# --------------------------------------------------------------------------- checkpoints


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def save_checkpoint(model: nn.Module, directory: str | Path, state: Mapping[str, Any]) -> Path:
    """Write ``model.safetensors`` (the state dict; tied tensors stored once) and
    ``trainer_state.json`` (``state`` plus the BitNet config of every BitLinear) into ``directory``."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / "model.safetensors"))
    bitnet = {name: asdict(layer.config) for name, layer in bitlinear_layers(model)}
    payload = {**state, "bitnet_layers": bitnet}
    (directory / "trainer_state.json").write_text(json.dumps(_jsonable(payload), indent=2))
    return directory


def load_checkpoint(model: nn.Module, directory: str | Path) -> dict:
    """Load ``model.safetensors`` from ``directory`` into ``model`` (strict) and return the JSON state.

    Convert the model first (``quantize_``) when the checkpoint holds BitLinear layers.
    """
    from safetensors.torch import load_model

    directory = Path(directory)
    for name in ("model.safetensors", "trainer_state.json"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"checkpoint directory {str(directory)!r} has no {name}")
    load_model(model, str(directory / "model.safetensors"), strict=True)
    return json.loads((directory / "trainer_state.json").read_text())


# --------------------------------------------------------------------------- training


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (biases and norm gains are left alone)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


def _is_better(value: float, best: float | None, monitor: str) -> bool:
    if best is None:
        return True
    return value > best if MONITORS[monitor] == "max" else value < best


def restored_epoch(history: Sequence[Mapping[str, Any]], monitor: str = "eval_accuracy") -> int:
    """The epoch whose weights ``train(..., TrainConfig(restore_best=True, monitor=monitor))`` ends
    with, replayed from its ``history``: the first epoch that beats every earlier one on
    ``monitor`` and is not beaten later (a tie keeps the earlier epoch, as in training)."""
    if monitor not in MONITORS:
        raise ValueError(f"monitor must be one of {tuple(MONITORS)}, got {monitor!r}")
    best, epoch = None, None
    for row in history:
        if _is_better(row[monitor], best, monitor):
            best, epoch = row[monitor], int(row["epoch"])
    if epoch is None:
        raise ValueError("the history is empty")
    return epoch


def train(
    model: nn.Module,
    train_loader: torch.utils.data.DataLoader,
    eval_loader: torch.utils.data.DataLoader | None = None,
    *,
    config: TrainConfig | None = None,
    teacher: nn.Module | None = None,
    distill: DistillConfig | None = None,
    accelerator: Any = None,
) -> History:
    """Fine-tune a teacher, run QAT, or distil into a student: one loop for all three.

    Every step: forward (and the teacher's, without grad), ``distillation_loss``, backward,
    gradient clipping, AdamW step, learning-rate schedule step, and (while ``quant_warmup_ratio``
    lasts) the BitLinear λ ramp. After every epoch: evaluation, the history row, checkpoints,
    early stopping. The model is trained in place; with ``restore_best`` it ends at its best epoch.

    Args:
        model: the model to train (HF or plain torch classifier).
        train_loader: DataLoader of dict batches (input_ids, attention_mask, labels) or (x, y).
        eval_loader: optional DataLoader of the same kind, for eval_loss / eval_accuracy.
        config: TrainConfig (defaults if None).
        teacher: optional frozen teacher (run in eval mode under no_grad).
        distill: DistillConfig (default: the task loss only).
        accelerator: an ``accelerate.Accelerator``; a default one (CPU or the visible GPU, or the
            processes of ``accelerate launch``) if None.

    Returns:
        History: one dict per epoch run.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    config = TrainConfig() if config is None else config
    distill = DistillConfig() if distill is None else distill
    for name, value, kind in (("config", config, TrainConfig), ("distill", distill, DistillConfig)):
        if not isinstance(value, kind):
            raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
    if distill.needs_teacher and teacher is None:
        raise ValueError("distill has teacher terms (logit/hidden/attention weight > 0) but teacher is None")
    if teacher is not None and not distill.needs_teacher:
        raise ValueError(
            "a teacher was given but distill uses no teacher term: set logit/hidden/attention_weight"
        )
    if config.monitor.startswith("eval") and eval_loader is None:
        if config.early_stopping_patience is not None:
            raise ValueError(f"early stopping on monitor={config.monitor!r} needs an eval_loader, got None")
        config = TrainConfig(**{**asdict(config), "monitor": "train_loss"})  # restore_best by train loss
    if not isinstance(train_loader, torch.utils.data.DataLoader):
        raise TypeError(f"train_loader must be a torch DataLoader, got {type(train_loader).__name__}")
    if len(train_loader) == 0:
        raise ValueError("train_loader is empty")

    accelerator = Accelerator() if accelerator is None else accelerator
    set_seed(config.seed)
    optimizer = _optimizer(model, config)
    # counted on the unsharded loader: accelerate's prepared scheduler steps num_processes times a call
    total_steps = config.epochs * len(train_loader)
    scheduler = get_scheduler(
        config.lr_schedule,
        optimizer,
        num_warmup_steps=round(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    if teacher is not None:
        teacher = accelerator.prepare_model(teacher, evaluation_mode=True).eval()

    quant_warmup_steps = round(config.quant_warmup_ratio * config.epochs * len(train_loader))
    has_bitlinear = bool(bitlinear_layers(model))
    history, best, best_state, stale, step = History(), None, None, 0, 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        sums: dict[str, float] = {}
        n_batches = 0
        bar = tqdm(
            train_loader,
            desc=f"epoch {epoch}/{config.epochs}",
            disable=not (config.progress and accelerator.is_local_main_process),
            leave=False,
        )
        for batch in bar:
            if has_bitlinear and quant_warmup_steps:
                set_quant_strength(model, linear_warmup_lambda(step, quant_warmup_steps))
            inputs, labels = _split_batch(batch)
            mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
            student_out = _forward(model, inputs, distill)
            teacher_out = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_out = _forward(teacher, inputs, distill)
            loss, parts = distillation_loss(student_out, teacher_out, labels, distill, mask)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch}, step {step}")
            accelerator.backward(loss)
            if config.max_grad_norm is not None:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            n_batches += 1
            for name, value in {"loss": loss, **parts}.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if has_bitlinear and quant_warmup_steps:
            set_quant_strength(model, linear_warmup_lambda(step, quant_warmup_steps))

        names = list(sums)  # same on every process; the means are averaged over processes
        means = accelerator.reduce(
            torch.tensor([sums[n] / n_batches for n in names], device=accelerator.device), "mean"
        )
        row: dict[str, Any] = {"epoch": epoch, "steps": step}
        row.update({f"train_{name}": float(value) for name, value in zip(names, means)})
        if eval_loader is not None:
            metrics = evaluate(model, eval_loader, accelerator)
            row.update({f"eval_{k}": v for k, v in metrics.items()})
        row["lr"] = scheduler.get_last_lr()[0]
        if has_bitlinear:
            row["quant_strength"] = bitlinear_layers(model)[0][1].quant_strength
        history.append(row)

        improved = _is_better(row[config.monitor], best, config.monitor)
        if improved:
            best, stale = row[config.monitor], 0
            if config.restore_best:
                best_state = {
                    k: v.detach().to("cpu", copy=True)
                    for k, v in accelerator.unwrap_model(model).state_dict().items()
                }
        else:
            stale += 1
        if config.checkpoint_dir is not None:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                state = {
                    "epoch": epoch,
                    "train_config": asdict(config),
                    "distill_config": asdict(distill),
                    "history": list(history),
                }
                unwrapped = accelerator.unwrap_model(model)
                save_checkpoint(unwrapped, Path(config.checkpoint_dir) / "last", state)
                if improved:
                    save_checkpoint(unwrapped, Path(config.checkpoint_dir) / "best", state)
        if config.early_stopping_patience is not None and stale >= config.early_stopping_patience:
            break

    if best_state is not None:
        accelerator.unwrap_model(model).load_state_dict(best_state)
    return history
