"""Compiled engines for packed ternary models: a whole forward pass in one call into Numba.

The packed layers of :mod:`labutils.kernels` are fast, but a model built from them in torch
spends most of a token between them: a few hundred small torch operations, torch<->numpy
conversions and a Numba parallel region per projection, each a trip through Python, with two
OpenMP thread pools (torch's and Numba's) on the same cores (``results/engine/overhead.md``
measures each of those, one experiment per hypothesis: :mod:`labutils.engine.overhead`).
An engine removes the trips: the weights are copied once into flat arrays, every buffer is
allocated once, and one compiled function runs the model.

- :mod:`labutils.engine.ops`: the shared compiled primitives (RMSNorm, per-token int8
  quantization, the ternary GEMV/GEMM through the kernels of the active path, RoPE, attention
  over a KV cache with grouped-query heads, SwiGLU, residual adds), each in place on
  preallocated arrays.
- :mod:`labutils.engine.decoder`: :class:`DecoderEngine`, chapter 8's W1.58A8 decoder as one
  call per forward pass (prompt or token); ``lm.model.generate`` uses it for packed decoders.
"""

from labutils.engine.decoder import DecoderEngine, EngineShape, engine_for, is_packed_decoder

__all__ = ["DecoderEngine", "EngineShape", "engine_for", "is_packed_decoder"]
