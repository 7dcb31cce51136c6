"""labutils: the code the 1-Bit LLM Lab Book teaches.

One module per concept:

- ``labutils.quant``      uniform, binary and ternary quantizers and their error metrics
- ``labutils.widgets``    the bit-width explorer (live ipywidgets and a static plotly twin)
- ``labutils.plots``      showing plotly figures the same way in Jupyter, Colab and the book
"""

__version__ = "0.1.0"
