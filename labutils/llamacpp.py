"""llama.cpp through ``llama-cpp-python``: load a GGUF file, decode greedily, read logits.

The peer side of ``python -m labutils.bench peers`` (:mod:`labutils.peers`), kept apart so the
benchmark reads as the comparison and this module as the one place that touches llama.cpp's
Python binding. ``pip install 'labutils[peers]'`` provides it (it compiles llama.cpp for the
machine on install); every function raises ImportError saying so when it is missing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["require_llama_cpp", "load_llama", "llama_last_logits", "llama_decode_once", "llama_greedy", "llama_logits"]


def require_llama_cpp():
    """The ``llama_cpp`` module, or ImportError saying how to get it."""
    try:
        import llama_cpp
    except ImportError as error:
        raise ImportError(
            "the peers benchmark needs llama-cpp-python: pip install 'labutils[peers]' "
            "(it compiles llama.cpp for this CPU, minutes on 2 cores)"
        ) from error
    return llama_cpp


def load_llama(path: str | os.PathLike, n_ctx: int, threads: int, *, logits_all: bool = False):
    """A ``llama_cpp.Llama`` on the GGUF ``path``: ``threads`` threads for prompts and for
    generation, weights read into memory (``use_mmap=False``, so the resident set counts them),
    no console output."""
    llama_cpp = require_llama_cpp()
    if not Path(path).is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    return llama_cpp.Llama(
        model_path=os.fspath(path), n_ctx=n_ctx, n_batch=max(n_ctx, 32), n_ubatch=max(n_ctx, 32),
        n_threads=threads, n_threads_batch=threads, logits_all=logits_all, use_mmap=False, verbose=False,
    )  # fmt: skip


def llama_last_logits(llm) -> np.ndarray:
    """float32 [vocab]: the logits of the last position evaluated (a copy)."""
    llama_cpp = require_llama_cpp()
    pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).copy()


def llama_decode_once(llm, prompt: Sequence[int], new_tokens: int) -> tuple[float, float]:
    """Seconds of the prefill of ``prompt`` and of ``new_tokens`` greedy steps after it, in
    llama.cpp: the loop of :func:`labutils.lm.experiment.decode_once` (the KV cache is cleared
    first: ``eval`` after ``reset`` drops every cached position)."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(list(prompt))
    logits = llama_last_logits(llm)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([int(np.argmax(logits))])
        logits = llama_last_logits(llm)
    return prefill, time.perf_counter() - start


def llama_greedy(llm, prompt: Sequence[int], new_tokens: int) -> list[int]:
    """The ``new_tokens`` greedy tokens llama.cpp generates after ``prompt`` (ids)."""
    llm.reset()
    llm.eval(list(prompt))
    out = []
    for _ in range(new_tokens):
        out.append(int(np.argmax(llama_last_logits(llm))))
        llm.eval([out[-1]])
    return out


def llama_logits(llm, tokens: Sequence[int]) -> np.ndarray:
    """float32 [len(tokens), vocab]: llama.cpp's logits at every position of ``tokens`` (one
    prefill; ``llm`` must be loaded with ``logits_all=True``)."""
    llm.reset()
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)
