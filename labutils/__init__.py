"""labutils: the code the 1-Bit LLM Lab Book teaches.

One module per concept (import the one you need: ``from labutils import quant``):

- ``labutils.quant``      uniform, binary and ternary quantizers and their error metrics
- ``labutils.widgets``    the bit-width explorer (live ipywidgets and a static plotly twin)
- ``labutils.bitlinear``  BitLinear, the straight-through estimator, ``quantize_(model, config)``
- ``labutils.sensitivity`` one layer at a time: which layers ternarization hurts, mixed-precision plans
- ``labutils.distill``    knowledge-distillation losses and one training loop (accelerate)
- ``labutils.packing``    1-bit, 2-bit and base-3 (1.6-bit) packers with exact inverses
- ``labutils.packfile``   the packed model file (safetensors, checksummed) and size reports
- ``labutils.kernels``    Numba popcount kernels and packed inference (``PackedBitLinear``)
- ``labutils.data``       IMDb from a Parquet folder, the Hugging Face Hub or the embedded sample
- ``labutils.models``     the default classifier (all-MiniLM-L6-v2), offline first
- ``labutils.measure``    CPU timings, peak memory, multiply-accumulates and energy estimates
- ``labutils.benchmark``  the IMDb benchmark: train, measure, report (``bench imdb``)
- ``labutils.bench``      ``python -m labutils.bench {packing,kernels,imdb}``
- ``labutils.plots``      plotly figures that draw in Jupyter, Colab and the offline book
- ``labutils.checks``     self-checks of the chapters' and the labs' exercises (``check_*``)
"""

__version__ = "0.1.0"
