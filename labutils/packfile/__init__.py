"""A packed model file: 1-bit / 1.58-bit weights packed into bytes, on top of safetensors.

``save_packed(model, path)`` writes one safetensors file (no pickle anywhere):

- every BitLinear weight (duck-typed: a module with ``quantized_weight()`` and
  ``config.weight_bits``) as its packed codes (``labutils.packing``: ``"binary"`` for 1 bit,
  ``"ternary2"`` or ``"ternary3"`` for 1.58 bits, a k-bit stream ``"int{k}"`` for k = 2..8) plus
  its float32 scale;
- embeddings (``nn.Embedding`` weights) in float, or k-bit group-quantized (``embeddings="int4"``:
  symmetric absmax over groups of ``group_size`` consecutive values of a row, as
  ``labutils.quant.quantize(..., granularity="group")``);
- everything else of the state dict (norms, biases, the float heads, buffers) as is, floats in
  ``float_dtype`` (fp32, lossless by default, or fp16 / bf16).

The safetensors ``__metadata__`` holds ``format``, ``format_version`` and a JSON ``manifest``
(for every state-dict name: kind, scheme, shape, dtype, and the sha256 of every stored tensor)
together with the manifest's own sha256, so every byte of the file is checked on load::

    __metadata__ = {"format": "labutils.packfile", "format_version": "1",
                    "manifest": "{...}", "manifest_sha256": "..."}
    manifest     = {"options": {...}, "entries": {name: entry}, "sha256": {stored key: hex}}

    entry kinds  float    {"shape", "dtype"}                     stored as  name
                 raw      {"shape", "dtype"}  (integer buffers)  stored as  name
                 packed   {"shape", "dtype", "scheme", "scale_shape"}       name:codes, name:scale
                 grouped  {"shape", "dtype", "bits", "group_size"}          name:codes, name:scale
                 alias    {"of": other name}  (tied weights, stored once)

``load_packed(path)`` reads the bytes once, checks everything (header, version, checksums,
shapes, codes) and raises :class:`PackedFileError`, and only that, for any damaged or foreign
file. With a model it checks that the file fits the model completely before it changes
anything, then loads: labutils' BitLinear layers are pinned to the stored codes and scales
(``BitLinear.pin_quantized_weight``), which makes the loaded model's forward pass bit-identical to
the saved one's in every dtype; other BitLinear-like modules get latent weights ``codes * k`` with
``k`` searched so that their own quantizer returns exactly the stored ``codes * scale``.

``size_report(model)`` gives the bytes of the same model stored as fp32, fp16, int8, 2-bit,
1.6-bit and 1-bit, split into embeddings, linear layers and the rest; the formulas are exactly
what ``save_packed`` writes, the header aside.

The package: ``format`` (constants, ``PackedFileError``, how each tensor is stored), ``write``
(``save_packed``, ``write_atomic``), ``read`` (``load_packed``) and ``sizes`` (``size_report``);
everything is importable from ``labutils.packfile``.
"""

from labutils.packfile.format import FLOAT_DTYPES, FORMAT, FORMAT_VERSION, TERNARY_SCHEMES, PackedFileError
from labutils.packfile.read import PackedContents, header_bytes, load_packed
from labutils.packfile.sizes import VARIANTS, SizeRow, format_size_report, size_report
from labutils.packfile.write import save_packed, sorted_metadata, write_atomic

__all__ = [
    "FLOAT_DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "TERNARY_SCHEMES",
    "VARIANTS",
    "PackedContents",
    "PackedFileError",
    "SizeRow",
    "format_size_report",
    "header_bytes",
    "load_packed",
    "save_packed",
    "size_report",
    "sorted_metadata",
    "write_atomic",
]
