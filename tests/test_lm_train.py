"""Tests for labutils.lm.train (the language-model trainer on accelerate) and labutils.lm.preset's
training and LoRA fields: one process trains as the plain loop it replaced, gradient accumulation
and two CPU processes train the same model, BitNet's two-stage schedule, LoRA on some layers."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from labutils.lm import experiment
from labutils.lm import train as lm_train
from labutils.lm.model import Decoder
from labutils.lm.preset import LMPreset, row_config
from labutils.lm.tokenizer import train_tokenizer
from labutils.runs import UsageError, parse_set_options

pytest.importorskip("accelerate")
pytest.importorskip("datasets")

# A few steps of the smallest decoder on a slice of the embedded sample: seconds on a CPU.
TINY = LMPreset(
    name="tiny", data_source="sample", train_reviews=300, test_reviews=40, holdout_reviews=20, vocab_size=300,
    sizes=("xs",), seq_len=16, batch_size=4, steps=6, warmup_steps=2, eval_every=3, eval_tokens=512,
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    reviews = lm_train.load_reviews(TINY)
    return train_tokenizer(reviews.train, TINY.vocab_size), reviews


def _train(row: str, preset: LMPreset, out: Path, data) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    return lm_train.train_row(row, preset, out, *data, torch.device("cpu"), quiet=True)


def _plain_loop(row: str, preset: LMPreset, tokenizer, reviews) -> tuple[list[float], Decoder]:
    """The trainer before accelerate (labutils.lm.experiment.train_row at commit 9e80d85) on the
    CPU: per-step losses and the trained model."""
    torch.manual_seed(preset.seed)
    config = row_config(row, preset, tokenizer.get_vocab_size())
    model = Decoder(config, seed=preset.seed)
    peak = preset.lr_fp if config.quant == "fp" else preset.lr_bitnet
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": preset.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.95))
    train = lm_train.token_stream(tokenizer, reviews.train)
    generator = torch.Generator().manual_seed(preset.seed)
    losses = []
    for step in range(preset.steps):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lm_train.learning_rate(step, peak, preset)
        x, y = lm_train.random_windows(train, preset.batch_size, preset.seq_len, generator)
        loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, model


@pytest.mark.parametrize("row", ["fp-xs", "w1.58a8-xs"])
def test_one_process_trains_as_the_plain_loop(data, tmp_path, row):
    tokenizer, reviews = data
    losses, reference = _plain_loop(row, TINY, tokenizer, reviews)
    result = _train(row, TINY, tmp_path, data)
    assert result["processes"] == 1 and [h["step"] for h in result["history"]] == [3, 6]
    assert [h["train_loss"] for h in result["history"]] == pytest.approx([sum(losses[:3]) / 3, sum(losses[3:]) / 3], rel=1e-6)
    test = lm_train.token_stream(tokenizer, reviews.test)
    assert result["test_ppl"] == pytest.approx(lm_train.perplexity(reference, test, TINY.seq_len, TINY.eval_tokens), rel=1e-6)
    saved = lm_train.load_row(tmp_path, row, TINY, tokenizer.get_vocab_size())
    if row.startswith("fp-"):
        for (name, a), b in zip(reference.state_dict().items(), saved.state_dict().values()):
            assert torch.allclose(a, b, atol=1e-6), name
    else:  # the packed file holds the codes: the same ternary weights as the reference's
        for (name, a), (_, b) in zip(experiment._bitlinears(reference), experiment._bitlinears(saved)):
            assert torch.equal(a.quantized_weight()[0], b.quantized_weight()[0]), name
    on_disk = json.loads((tmp_path / f"train_{row}.json").read_text())
    assert on_disk["history"] == result["history"] and on_disk["preset"]["grad_accum_steps"] == 1


def test_gradient_accumulation_trains_the_same_model(data, tmp_path):
    """Two micro-batches of 2 windows per step are the batch of 4 (the same windows): the same
    losses and perplexities up to float rounding."""
    one = _train("fp-xs", TINY, tmp_path / "one", data)
    two = _train("fp-xs", dataclasses.replace(TINY, grad_accum_steps=2), tmp_path / "two", data)
    for a, b in zip(one["history"], two["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["holdout_ppl"] == pytest.approx(a["holdout_ppl"], rel=1e-5)
    assert two["test_ppl"] == pytest.approx(one["test_ppl"], rel=1e-5)
    assert two["tokens_seen"] == one["tokens_seen"]


def test_window_draws_are_the_batches_random_windows_draws(data):
    tokenizer, reviews = data
    stream = lm_train.token_stream(tokenizer, reviews.train)
    loader = torch.utils.data.DataLoader(lm_train.WindowDraws(stream, 16, 4, seed=3), batch_size=2)
    generator = torch.Generator().manual_seed(3)
    batches = iter(loader)
    for _ in range(3):
        x, y = lm_train.random_windows(stream, 4, 16, generator)
        for half in (slice(0, 2), slice(2, 4)):  # a batch of 4 as two micro-batches of 2
            got_x, got_y = next(batches)
            assert torch.equal(got_x, x[half]) and torch.equal(got_y, y[half])
    with pytest.raises(ValueError, match="fewer than one window"):
        lm_train.WindowDraws(stream[:10], 16, 4, seed=0)


# --------------------------------------------------------------------------- two-stage schedule


def test_two_stage_schedule_drops_the_rate_and_the_weight_decay_at_the_split():
    off = LMPreset(name="t", steps=100, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.1)
    on = dataclasses.replace(off, two_stage=True, stage2_start=0.5, stage2_lr_ratio=2 / 3)
    assert lm_train.stage2_step(off) is None and lm_train.stage2_step(on) == 50
    single = [lm_train.learning_rate(s, 1.5e-3, off) for s in range(100)]
    two = [lm_train.learning_rate(s, 1.5e-3, on) for s in range(100)]
    assert two[:50] == single[:50]
    assert two[50:] == pytest.approx([2 / 3 * r for r in single[50:]], rel=1e-12)
    assert two[50] < two[49] * 0.7  # an abrupt drop, then a decay on the same curve
    assert all(a >= b for a, b in zip(two[50:], two[51:])) and two[-1] == pytest.approx(2 / 3 * 1.5e-4, rel=1e-2)
    assert [lm_train.weight_decay(s, on) for s in (0, 49, 50, 99)] == [0.1, 0.1, 0.0, 0.0]
    assert {lm_train.weight_decay(s, off) for s in range(100)} == {0.1}


def test_the_schedule_reaches_the_optimizer_matrices_only_decay():
    on = LMPreset(name="t", steps=10, warmup_steps=2, two_stage=True, stage2_weight_decay=0.01)
    model = Decoder(row_config("w1.58a8-xs", on, 64))
    optimizer = lm_train._optimizer(model, 1e-3, on.weight_decay, torch.device("cpu"))
    for step, (decay, lr) in {4: (0.1, lm_train.learning_rate(4, 1e-3, on)), 5: (0.01, lm_train.learning_rate(5, 1e-3, on))}.items():
        lm_train._set_schedule(optimizer, step, 1e-3, on)
        assert [g["weight_decay"] for g in optimizer.param_groups] == [decay, 0.0]
        assert [g["lr"] for g in optimizer.param_groups] == [lr, lr]


def test_two_stage_row_trains_and_records_its_schedule(data, tmp_path):
    preset = dataclasses.replace(TINY, two_stage=True, lr_fp=3e-3)
    result = _train("fp-xs", preset, tmp_path / "two-stage", data)
    plain = _train("fp-xs", TINY, tmp_path / "plain", data)
    assert result["preset"]["two_stage"] is True and result["preset"]["stage2_lr_ratio"] == pytest.approx(2 / 3)
    assert result["history"][-1]["train_loss"] != plain["history"][-1]["train_loss"]


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("grad_accum_steps", 3, "multiple of grad_accum_steps"),
        ("grad_accum_steps", 0, "positive int"),
        ("two_stage", 1, "true or false"),
        ("stage2_start", 1.0, r"stage2_start must be .* \(0, 1\)"),
        ("stage2_start", 0, "stage2_start"),
        ("stage2_lr_ratio", 1.5, r"stage2_lr_ratio must be in \(0, 1\]"),
        ("stage2_weight_decay", -0.1, "stage2_weight_decay must be a number >= 0"),
        ("lora_skip", ("",), "lora_skip must be non-empty"),
        ("lora_steps", 0, "lora_steps must be a positive int"),
    ],
)
def test_preset_refuses_bad_training_fields(field, value, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **{field: value})


def test_the_new_fields_are_one_set_each():
    overrides = parse_set_options(["two_stage=true", "grad_accum_steps=2", "lora_skip=mlp,blocks.0", "lora_rank=32"], LMPreset)
    preset = dataclasses.replace(TINY, **overrides)
    assert (preset.two_stage, preset.grad_accum_steps, preset.lora_skip, preset.lora_rank) == (True, 2, ("mlp", "blocks.0"), 32)


# --------------------------------------------------------------------------- LoRA on some layers


def test_lora_skip_wraps_the_other_layers_and_load_lora_needs_the_same(tmp_path):
    preset = dataclasses.replace(experiment.PRESETS["ci"], lora_rank=2, lora_skip=("mlp",))
    row = f"w1.58a8-{preset.lora_size}"
    model = Decoder(row_config(row, preset, 64), seed=3).eval()
    lm_train.save_row(model, tmp_path, row)
    tuned = lm_train.load_row(tmp_path, row, preset, 64)
    wrapped = experiment.add_preset_lora_(tuned, preset)
    assert wrapped and all(".attn." in name for name in wrapped)
    everything = experiment.add_preset_lora_(lm_train.load_row(tmp_path, row, preset, 64), dataclasses.replace(preset, lora_skip=()))
    assert set(wrapped) < set(everything) and any(".mlp." in name for name in everything)
    adapters = {n: torch.randn_like(p) for n, p in tuned.named_parameters() if p.requires_grad}
    experiment._save_tensors(adapters, tmp_path / "lora_adapters.safetensors")
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        for name, tensor in adapters.items():
            tuned.get_parameter(name).copy_(tensor)
        assert torch.allclose(experiment.load_lora(tmp_path, preset, 64)(x), tuned(x), atol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        experiment.load_lora(tmp_path, dataclasses.replace(preset, lora_skip=()), 64)


# --------------------------------------------------------------------------- several processes


def test_only_the_train_stage_runs_under_accelerate_launch(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert lm_train.launched_processes() == (1, 2)
    with pytest.raises(UsageError, match="only --stage train"):
        experiment.run(TINY, tmp_path, stages=("tokenizer", "train"))
    assert not (tmp_path / "preset.json").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_train_the_model_one_process_trains(data, tmp_path):
    """Two CPU processes under ``accelerate launch`` (``--multi_gpu`` is its torchrun launcher;
    ``--device cpu`` makes the Accelerator a CPU one, gloo): each process takes half of every
    batch (the same windows) and DDP averages the gradients, so only the order of floating-point
    sums differs from one process. Measured on this course's Xeon: test perplexities 3e-7 apart
    (relative) for fp-xs and w1.58a8-xs; the tolerance is 0.1 %, while a wrong split (other
    windows, a doubled batch) moves them by several per cent."""
    tokenizer, _ = data
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    sets = [f"{key}={value}" for key, value in dataclasses.asdict(TINY).items() if key in
            ("train_reviews", "test_reviews", "holdout_reviews", "seq_len", "batch_size", "steps", "warmup_steps", "eval_every", "eval_tokens")]  # fmt: skip
    command = ["-m", "labutils.bench", "lm", "--preset", "ci", "--stage", "train", "--rows", "fp-xs,w1.58a8-xs", "--device", "cpu",
               "--quiet", "--tokenizer", str(tmp_path / "tokenizer.json"), *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LABBOOK_IMDB_DIR", None)
    subprocess.run([sys.executable, *command, "--out", str(tmp_path / "one")], check=True, env=env, timeout=600)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]  # fmt: skip
    subprocess.run([*launch, *command, "--out", str(tmp_path / "two")], check=True, env=env, timeout=600)
    written = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "fp-xs.safetensors", "preset.json", "progress_fp-xs.json", "progress_w1.58a8-xs.json", "train_fp-xs.json",
        "train_w1.58a8-xs.json", "w1.58a8-xs.packed",
    ]  # fmt: skip
    for row in ("fp-xs", "w1.58a8-xs"):
        one, two = (json.loads((tmp_path / name / f"train_{row}.json").read_text()) for name in ("one", "two"))
        assert (one["processes"], two["processes"]) == (1, 2) and two["tokens_seen"] == one["tokens_seen"]
        assert two["test_ppl"] == pytest.approx(one["test_ppl"], rel=1e-3)
        for a, b in zip(one["history"], two["history"], strict=True):
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
            assert b["holdout_ppl"] == pytest.approx(a["holdout_ppl"], rel=1e-3)
