"""moeaudit: a causal audit of expert importance in Mixture-of-Experts language models.

Import this package (or :mod:`nnsight`) before any ``transformers.models.*`` module:
nnsight must be imported first for its module wrapping to see the model classes.
"""

import os as _os
import warnings as _warnings

# Progress bars go to stderr as plain text; the notebook widget front-end is never used, so
# tqdm's notice that ipywidgets is missing is noise in executed notebooks.
_warnings.filterwarnings("ignore", message="IProgress not found")

import nnsight  # noqa: E402,F401  (import order matters, see module docstring)
if _os.environ.get("MOEAUDIT_PROGRESS", "1") in ("0", "false", "False"):
    _os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()

__version__ = "0.1.0"
