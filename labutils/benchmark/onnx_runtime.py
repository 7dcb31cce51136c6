"""The ONNX Runtime rows: the FP32 teacher exported to ONNX and its dynamic INT8 quantization
(``onnxruntime.quantization.quantize_dynamic``), what a CPU user would deploy without retraining.

The CPU stage times them beside the other rows; the train stage's INT8 subprocess scores the
INT8 one on the test reviews (``--stage int8 --rows int8,onnx-int8``). Both need ``onnx`` and
``onnxruntime`` (``pip install onnxruntime onnx``)."""

from __future__ import annotations

import copy
import importlib.util
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

ONNX_ROWS = ("onnx-fp32", "onnx-int8")
ONNX_LABELS = {"onnx-fp32": "FP32 (ONNX Runtime)", "onnx-int8": "INT8 dynamic (ONNX Runtime)"}


class OnnxModel(nn.Module):
    """An ONNX Runtime session called like the HF classifier: ``model(input_ids=, attention_mask=).logits``
    (int64 ``[batch, length]`` in, float32 ``[batch, classes]`` out)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        super().__init__()
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        # no spin-waiting after a call: with rows interleaved, ONNX Runtime's spinning threads would
        # take the cores from the next row (they made FP32 at batch 1 2.5x slower)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.weights_nbytes = initializer_bytes(path)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> Any:
        feed = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        logits = self.session.run(["logits"], feed)[0]
        return type("Output", (), {"logits": torch.from_numpy(logits)})()

    def set_attn_implementation(self, attn: str) -> None:  # the graph's attention is fixed at export
        pass


def initializer_bytes(path: Path) -> int:
    """Bytes of an ONNX file's weights (its graph initializers, as arrays)."""
    import onnx

    return sum(onnx.numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)


def export_onnx(teacher: nn.Module, folder: Path) -> dict[str, Path]:
    """``{"onnx-fp32": path, "onnx-int8": path}``: ``teacher`` (an HF sequence classifier) exported
    to ``folder/fp32.onnx`` with dynamic batch and length, and that file quantized dynamically to
    ``folder/int8.onnx`` (weights int8 per tensor, activations quantized at run time). Files already
    there are reused. Raises ImportError without onnx/onnxruntime."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if importlib.util.find_spec("onnx") is None:  # torch's exporter needs it: fail before writing anything
        raise ImportError("No module named 'onnx'")

    fp32, int8 = folder / "fp32.onnx", folder / "int8.onnx"
    if not fp32.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, teacher.config.vocab_size, (2, 16), generator=g)
        wrapped = _LogitsOnly(copy.deepcopy(teacher).eval())
        partial = fp32.with_suffix(".onnx.partial")  # an interrupted export leaves no fp32.onnx to reuse
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (ids, torch.ones_like(ids)), str(partial), dynamo=False,
                              input_names=["input_ids", "attention_mask"], output_names=["logits"], opset_version=17,
                              dynamic_axes={"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"},
                                            "logits": {0: "batch"}})  # fmt: skip
        partial.replace(fp32)
    if not int8.is_file():
        partial = folder / "int8.partial.onnx"
        quantize_dynamic(str(fp32), str(partial), weight_type=QuantType.QInt8)
        partial.replace(int8)
    return {"onnx-fp32": fp32, "onnx-int8": int8}


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
