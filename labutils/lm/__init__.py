"""Chapter 8's language model: a Llama-style decoder (full precision or BitNet b1.58), its BPE
tokenizer, and the experiment that trains, tunes and measures them.

- ``labutils.lm.model``: ``LMConfig``, ``Decoder``, ``KVCache``, ``generate``.
- ``labutils.lm.tokenizer``: ``train_tokenizer``, ``load_tokenizer``, ``clean_review``.
- ``labutils.lm.preset``: ``LMPreset`` (every setting of a run), ``PRESETS``, ``SIZES``.
- ``labutils.lm.train``: training one decoder on ``accelerate``, perplexity, a row's weights file.
- ``labutils.lm.experiment``: ``python -m labutils.bench lm`` (presets ``ci`` and ``full``).
"""

from labutils.lm.model import Decoder, KVCache, LMConfig, generate

__all__ = ["Decoder", "KVCache", "LMConfig", "generate"]
