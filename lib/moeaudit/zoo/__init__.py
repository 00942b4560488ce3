"""The models shipped with the package: the book's three default MoE language models and the
ten models of the redundancy family (:data:`REDUNDANCY_MODELS`).

Each lives in ``moeaudit/zoo/<name>/`` in the standard Hugging Face layout (``config.json``,
``model.safetensors``, tokenizer files) next to its ``training_log.csv``,
``training_summary.json`` and model card ``README.md``::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from moeaudit.zoo import zoo_path

    model = AutoModelForCausalLM.from_pretrained(zoo_path("tiny-olmoe"))
    tokenizer = AutoTokenizer.from_pretrained(zoo_path("tiny-olmoe"))

They are trained by ``python -m moeaudit.tooling.training <name>`` (see :mod:`moeaudit.tooling.training`).
"""

from __future__ import annotations

import json
from pathlib import Path

#: Short names of the shipped models, in the order the paper lists the real ones.
ZOO_MODELS = ("tiny-olmoe", "tiny-qwen-moe", "tiny-deepseek-v2")

#: The real checkpoint each shipped model stands in for.
MIRRORS = {
    "tiny-olmoe": "allenai/OLMoE-1B-7B-0924",
    "tiny-qwen-moe": "Qwen/Qwen1.5-MoE-A2.7B",
    "tiny-deepseek-v2": "deepseek-ai/DeepSeek-V2-Lite",
}

#: The controlled redundancy family: (routed experts E, top-k) settings of small OLMoE-class
#: models that are otherwise identical (data, tokenizer, width, depth, steps, seed policy).
#: 64 experts with k = 2, 4, 8 (OLMoE's ratio), 16, and 8 experts with top-2 (Mixtral's ratio).
REDUNDANCY_SETTINGS = ((64, 2), (64, 4), (64, 8), (64, 16), (8, 2))
#: Training seeds of every redundancy setting (two, so that the seed spread is measured).
REDUNDANCY_SEEDS = (0, 1)


def redundancy_name(n_experts: int, top_k: int, seed: int) -> str:
    """Short name of a redundancy-family model, e.g. ``olmoe-e64-k8-s0``."""
    return f"olmoe-e{n_experts}-k{top_k}-s{seed}"


#: Short names of the redundancy family, setting by setting, seeds within a setting.
REDUNDANCY_MODELS = tuple(redundancy_name(e, k, s) for e, k in REDUNDANCY_SETTINGS for s in REDUNDANCY_SEEDS)

#: Every model shipped with the package: the book's defaults, then the redundancy family.
SHIPPED_MODELS = ZOO_MODELS + REDUNDANCY_MODELS

ZOO_DIR = Path(__file__).resolve().parent


def zoo_path(name: str) -> Path:
    """The directory of the shipped model ``name`` (pass it to ``from_pretrained``).

    Raises ``ValueError`` for a name that is not shipped, and ``FileNotFoundError`` if the
    model's files are missing (e.g. a source checkout without the trained weights).
    """
    if name not in SHIPPED_MODELS:
        raise ValueError(f"unknown shipped model {name!r}; the shipped models are {', '.join(SHIPPED_MODELS)}")
    path = ZOO_DIR / name
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"the files of shipped model {name!r} are missing from {path}; "
                                f"train it with: python -m moeaudit.tooling.training {name}")
    return path


def load_summary(name: str) -> dict:
    """The ``training_summary.json`` of the shipped model ``name``."""
    return json.loads((zoo_path(name) / "training_summary.json").read_text())


# ----------------------------------------------------------------------------- model-card tables
# What the appendix on the default models shows, computed from ``training_summary.json`` records
# (one dict per model, as written by :mod:`moeaudit.tooling.training`).


#: Fraction of a layer's routing mass an expert must receive to count as "used".
USAGE_THRESHOLD = 0.002


#: quality gate of the shipped models: in every MoE layer at least this share of the routed experts
#: receives at least USAGE_THRESHOLD of the routing mass on the test split
MIN_FRAC_USED = 0.9


#: quality gate of the shipped models: test perplexity at most this fraction of the unigram baseline's
PPL_RATIO_MAX = 0.5


#: quality gate of the shipped models: on the embedded corpus, in its default form, the model's gain over
#: the in-sample unigram is at least this share of its gain on WikiText-2's test split, measured the same
#: way (:func:`moeaudit.tooling.training.measure_regime`), so that the default book audits a model on text it can read
REGIME_GAIN_RATIO_MIN = 0.75
