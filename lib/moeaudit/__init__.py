"""moeaudit: a causal audit of expert importance in Mixture-of-Experts language models.

nnsight must be imported before any ``transformers.models.*`` module for its module wrapping
to see the model classes: :mod:`moeaudit.models` (which every module that loads or wraps a
model imports) does so first, so import ``moeaudit.models`` (or :mod:`nnsight`) before
``transformers.models.*``. The package itself does not import nnsight, so that the parts that
need no model (statistics, released data, the book driver) start quickly.
"""

import os as _os
import warnings as _warnings

# Progress bars go to stderr as plain text; the notebook widget front-end is never used, so
# tqdm's notice that ipywidgets is missing is noise in executed notebooks.
_warnings.filterwarnings("ignore", message="IProgress not found")

if _os.environ.get("MOEAUDIT_PROGRESS", "1") in ("0", "false", "False"):
    _os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()

__version__ = "0.1.0"
