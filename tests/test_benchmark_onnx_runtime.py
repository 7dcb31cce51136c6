"""labutils.benchmark.onnx_runtime: the teacher exported to ONNX, its dynamic INT8 quantization,
and the session wrapper the benchmark calls like the HF classifier."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
transformers = pytest.importorskip("transformers")

from labutils.benchmark.onnx_runtime import ONNX_ROWS, OnnxModel, export_onnx  # noqa: E402


@pytest.fixture(scope="module")
def tiny_classifier():
    config = transformers.BertConfig(vocab_size=1200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64, num_labels=2)  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def test_export_runs_like_the_torch_model_and_int8_is_smaller(tiny_classifier, tmp_path):
    paths = export_onnx(tiny_classifier, tmp_path / "onnx")
    assert set(paths) == set(ONNX_ROWS) and all(p.is_file() for p in paths.values())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 1200, (3, 20), generator=g)  # another batch and length than the export's
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # a padded review
    with torch.no_grad():
        expected = tiny_classifier(input_ids=ids, attention_mask=mask).logits
    fp32, int8 = (OnnxModel(paths[row], threads=1) for row in ONNX_ROWS)
    torch.testing.assert_close(fp32(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-4, rtol=1e-4)
    assert (int8(input_ids=ids, attention_mask=mask).logits - expected).abs().max() < 0.1
    assert int8.weights_nbytes < 0.5 * fp32.weights_nbytes


def test_export_reuses_its_files(tiny_classifier, tmp_path):
    first = export_onnx(tiny_classifier, tmp_path)
    stamps = {row: p.stat().st_mtime_ns for row, p in first.items()}
    assert {row: p.stat().st_mtime_ns for row, p in export_onnx(tiny_classifier, tmp_path).items()} == stamps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.onnx", "int8.onnx"], "no partial files left behind"
