"""Self-checks: call ``check_*()`` on your answer for instant feedback, in Colab or on your own.

nbgrader's hidden tests do not run in Colab or for a reader on their own, so every exercise of
the chapters and of the graded labs has a check here. A check recomputes the right answer with
``labutils`` (no answer is written in the notebooks), runs your function on more inputs than the
visible tests, and either returns ``True`` after printing what was right, or raises
:class:`ExerciseError` with a message that says *what* is wrong: a shape or a dtype, a factor of 2,
bits for bytes, a forgotten clamp, the bit order reversed, the KL divergence the wrong way round, ...

- ``labutils.checks.chapters``: the chapters' exercises, which ask for values
  (``check_row_scales(my_row_scales, w)``);
- ``labutils.checks.reading``: the exercises that read committed measurements (chapter 6,
  appendices C and D): a paired ratio, its spread and verdict, a target met or on the line;
- ``labutils.checks.lab01`` ... ``lab08``: the labs' exercises, which ask for functions; each lab
  calls its checks right under the answer cells
  (``check_lab1_quantize_symmetric(quantize_symmetric, dequantize_symmetric)``).

Import any of them from here: ``from labutils.checks import check_row_scales``. The modules import
torch and numpy only; numba, transformers and ``labutils.lm`` are imported by the checks that use them.
"""

from labutils.checks import chapters, reading, lab01, lab02, lab03, lab04, lab05, lab06, lab07, lab08
from labutils.checks._common import ExerciseError
from labutils.checks.chapters import *  # noqa: F403
from labutils.checks.reading import *  # noqa: F403
from labutils.checks.lab01 import *  # noqa: F403
from labutils.checks.lab02 import *  # noqa: F403
from labutils.checks.lab03 import *  # noqa: F403
from labutils.checks.lab04 import *  # noqa: F403
from labutils.checks.lab05 import *  # noqa: F403
from labutils.checks.lab06 import *  # noqa: F403
from labutils.checks.lab07 import *  # noqa: F403
from labutils.checks.lab08 import *  # noqa: F403

LABS = {1: lab01, 2: lab02, 3: lab03, 4: lab04, 5: lab05, 6: lab06, 7: lab07, 8: lab08}
"""The labs' check modules, by lab number."""

__all__ = ["ExerciseError", *(n for n in chapters.__all__ if n != "ExerciseError"), *reading.__all__]
__all__ += [name for module in LABS.values() for name in module.__all__]
