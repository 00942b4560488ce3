"""The book's default models: three small MoE language models shipped with the package.

Each lives in ``moeaudit/zoo/<name>/`` in the standard Hugging Face layout (``config.json``,
``model.safetensors``, tokenizer files) next to its ``training_log.csv``,
``training_summary.json`` and model card ``README.md``::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from moeaudit.zoo import zoo_path

    model = AutoModelForCausalLM.from_pretrained(zoo_path("tiny-olmoe"))
    tokenizer = AutoTokenizer.from_pretrained(zoo_path("tiny-olmoe"))

They are trained by ``python -m moeaudit.training <name>`` (see :mod:`moeaudit.training`).
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

ZOO_DIR = Path(__file__).resolve().parent


def zoo_path(name: str) -> Path:
    """The directory of the shipped model ``name`` (pass it to ``from_pretrained``).

    Raises ``ValueError`` for a name that is not shipped, and ``FileNotFoundError`` if the
    model's files are missing (e.g. a source checkout without the trained weights).
    """
    if name not in ZOO_MODELS:
        raise ValueError(f"unknown shipped model {name!r}; the shipped models are {', '.join(ZOO_MODELS)}")
    path = ZOO_DIR / name
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"the files of shipped model {name!r} are missing from {path}; "
                                f"train it with: python -m moeaudit.training {name}")
    return path


def load_summary(name: str) -> dict:
    """The ``training_summary.json`` of the shipped model ``name``."""
    return json.loads((zoo_path(name) / "training_summary.json").read_text())
