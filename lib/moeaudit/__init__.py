"""moeaudit: a causal audit of expert importance in Mixture-of-Experts language models.

Import this package (or :mod:`nnsight`) before any ``transformers.models.*`` module:
nnsight must be imported first for its module wrapping to see the model classes.
"""

import nnsight  # noqa: F401  (import order matters, see module docstring)

__version__ = "0.1.0"
