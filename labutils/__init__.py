"""labutils: the code the 1-Bit LLM Lab Book teaches.

One module per concept (import the one you need: ``from labutils import quant``), in layers: a
module imports only from the layers below it (``tests/test_layers.py`` checks that no import
circle and no reach into another module's underscore names creeps in)::

    experiments   bench (the command line) -> peers (-> llamacpp), lm.experiment, benchmark
                  (IMDb), kernel_bench, packing_bench, engine.overhead -> runs (provenance,
                  files, --set)
    models        lm (decoder, tokenizer), export (GGUF), models (MiniLM), distill, augment,
                  sensitivity
    engine        the packed decoder and encoder as compiled steps (generate() runs on it)
    kernels       Numba popcount / int8 kernels, PackedBitLinear
    formats       packfile (the packed model file), packing (bit packers)
    layers        bitlinear (BitLinear, STE, quantize_), quant (quantizers)
    beside them   data, measure, stats, results, plots, widgets, checks

- ``labutils.quant``      uniform, binary and ternary quantizers and their error metrics
- ``labutils.bitlinear``  BitLinear, the straight-through estimator, ``quantize_(model, config)``
- ``labutils.packing``    1-bit, 2-bit and base-3 (1.6-bit) packers with exact inverses
- ``labutils.packfile``   the packed model file (safetensors, checksummed) and size reports
- ``labutils.kernels``    Numba popcount kernels and packed inference (``PackedBitLinear``)
- ``labutils.engine``     the packed decoder and encoder as compiled steps (no torch in the loop)
- ``labutils.export``     GGUF export of chapter 8's decoders for llama.cpp
- ``labutils.distill``    knowledge-distillation losses and one training loop (accelerate)
- ``labutils.augment``    TinyBERT-style data augmentation from embedding neighbours
- ``labutils.sensitivity`` one layer at a time: which layers ternarization hurts, mixed-precision plans
- ``labutils.lm``         chapter 8's decoder, its tokenizer and its experiment
- ``labutils.models``     the default classifier (all-MiniLM-L6-v2), offline first
- ``labutils.data``       IMDb from a Parquet folder, the Hugging Face Hub or the embedded sample
- ``labutils.measure``    CPU timings, peak memory, multiply-accumulates and energy estimates
- ``labutils.stats``      paired tests (McNemar) and seed summaries for accuracy differences
- ``labutils.runs``       what every experiment shares: provenance, atomic JSON/safetensors, ``--set``
- ``labutils.benchmark``  the IMDb benchmark: train, measure, report (``bench imdb``)
- ``labutils.kernel_bench`` / ``labutils.packing_bench``  ``bench kernels`` / ``bench packing``
- ``labutils.peers``      the packed decoder next to llama.cpp (``bench peers``)
- ``labutils.llamacpp``   llama.cpp through llama-cpp-python: load a GGUF, decode, read logits
- ``labutils.bench``      ``python -m labutils.bench {packing,kernels,imdb,lm,peers}``
- ``labutils.results``    the committed results, read in a checkout or fetched and verified
- ``labutils.plots``      plotly figures that draw in Jupyter, Colab and the offline book
- ``labutils.widgets``    the bit-width explorer (live ipywidgets and a static plotly twin)
- ``labutils.checks``     self-checks of the chapters' and the labs' exercises (``check_*``)
"""

__version__ = "0.1.0"
