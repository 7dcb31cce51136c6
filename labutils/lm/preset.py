"""The language-model experiment's settings: model sizes, the preset of a run, its rows.

Every setting of a run of ``python -m labutils.bench lm`` is a field of :class:`LMPreset`
(changed from the command line with ``--set FIELD=VALUE``) and is recorded in each result file.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from labutils.lm.model import QUANTS, LMConfig

__all__ = ["SIZES", "LMPreset", "PRESETS", "rows_of", "row_config"]

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


@dataclass(frozen=True)
class LMPreset:
    """Every setting of a run (recorded in each result file).

    Training (see :mod:`labutils.lm.train`): ``batch_size`` windows of ``seq_len`` tokens per
    optimizer step, whatever the number of processes; ``grad_accum_steps`` splits each step into
    that many micro-batches. ``two_stage`` turns on BitNet b1.58's two-stage schedule (off by
    default, so committed results stay reproducible): from step ``stage2_start * steps`` on, the
    learning rate is ``stage2_lr_ratio`` times the single-stage cosine and the weight decay is
    ``stage2_weight_decay`` (:func:`labutils.lm.train.learning_rate` cites the recipe).

    LoRA: adapters of ``lora_rank`` (scaling ``lora_alpha / lora_rank``) on every BitLinear of
    ``w1.58a8-<lora_size>`` except those matching a pattern of ``lora_skip`` (fnmatch against the
    dotted name or a run of its parts, e.g. ``"mlp"`` or ``"layers.0"``), ``lora_steps`` steps.
    """

    name: str
    data_source: str = "auto"
    train_reviews: int | None = None  # None: all 25,000 (minus the holdout)
    test_reviews: int | None = None
    holdout_reviews: int = 500
    vocab_size: int = 8192
    sizes: tuple[str, ...] = ("s", "m", "l")
    seq_len: int = 256
    batch_size: int = 64
    grad_accum_steps: int = 1
    steps: int = 2000
    warmup_steps: int = 200
    lr_fp: float = 1e-3
    lr_bitnet: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    two_stage: bool = False
    stage2_start: float = 0.5
    stage2_lr_ratio: float = 2 / 3
    stage2_weight_decay: float = 0.0
    eval_every: int = 250
    eval_tokens: int = 500_000
    lora_size: str = "l"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_steps: int = 800
    lora_lr: float = 1e-3
    lora_skip: tuple[str, ...] = ()
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
        for name in ("vocab_size", "seq_len", "batch_size", "grad_accum_steps", "steps", "eval_every", "lora_rank",
                     "lora_steps", "gen_reviews", "gen_tokens"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps}")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum_steps ({self.grad_accum_steps})")
        if not isinstance(self.two_stage, bool):
            raise ValueError(f"two_stage must be true or false, got {self.two_stage!r}")
        if not (_is_real(self.stage2_start) and 0 < self.stage2_start < 1):
            raise ValueError(f"stage2_start must be a fraction of the steps in (0, 1), got {self.stage2_start!r}")
        if not (_is_real(self.stage2_lr_ratio) and 0 < self.stage2_lr_ratio <= 1):
            raise ValueError(f"stage2_lr_ratio must be in (0, 1], got {self.stage2_lr_ratio!r}")
        for name in ("weight_decay", "stage2_weight_decay"):
            value = getattr(self, name)
            if not (_is_real(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not all(isinstance(p, str) and p for p in self.lora_skip):
            raise ValueError(f"lora_skip must be non-empty name patterns, got {self.lora_skip!r}")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


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
    """Every row of the preset: ``<quant>-<size>`` for each size, full precision first."""
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
