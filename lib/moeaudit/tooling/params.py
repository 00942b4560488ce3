"""The parameters of every chapter: one schema per chapter, checked before any work starts.

Each chapter of the book (``notebooks/<stem>.py``) has a cell tagged ``parameters``; its schema
here (:data:`SCHEMAS`) says, for every parameter, which values it accepts: type, range, allowed
values. Parameters that several chapters share are defined once (``Models``, ``Layers``,
``NPositions``, ...) and each chapter's schema lists the shared ones it has plus its own.

:func:`validate` is applied twice, so a bad value fails in about a second, before a model is
loaded, whichever way a chapter is run:

* by ``python -m moeaudit.tooling.book`` (``chapter`` and ``build``), before the kernel starts;
* by the cell after the parameters cell of every chapter, ``params.validate("<stem>", globals())``,
  so that papermill and Jupyter users get the same error.

A refused value raises :class:`ParameterError` (a ``ValueError``) with one line per chapter that
names the parameter, the value given and what is allowed::

    chapter 04_audit: n_positions=2 is refused (below the minimum 3); allowed: an integer >= 3 ...

Rules worth knowing:

* **Types are strict.** ``-p`` values are YAML, so ``-p n_positions abc`` is the string ``'abc'``
  and is refused, not converted; ``2.0`` is not an integer; ``1`` is not ``true``.
* **A list parameter takes a list, even for one value.** ``-p models tiny-olmoe`` is refused with
  the list form to type instead (``-p models '["tiny-olmoe"]'``), never iterated letter by letter.
* **Unknown names are refused** naming the closest parameter (``n_position`` -> ``n_positions``).
* **Checks that need the model read only its ``config.json``** (shipped models and local
  directories; no weights, no transformers import): the layers asked for must be MoE layers of
  every model, chapters that compare active experts need top-k >= 2, ``max_tokens`` must fit the
  model's context and ``min_context`` must leave positions in texts of that length. The MoE layers
  are derived from the config by the family's rule in the registry
  (:func:`moeaudit.families.moe_layer_indices`), the one :func:`moeaudit.models.layout_from_config`
  uses. A Hugging Face id is not looked up: its checks are
  left to :func:`moeaudit.models.load_model` and the chapter.
* **Left to the library**, because they need the tokenized corpus: the upper bounds of
  ``n_positions`` (:func:`moeaudit.corpus.sample_positions`), ``n_texts``
  (:func:`moeaudit.corpus.select_texts`) and the example position ``t`` of chapter 1. Whether the
  corpus file exists and holds text, and whether WikiText-2 is available for
  ``corpus="wikitext-2"``, is checked by :func:`moeaudit.corpus.resolve_corpus`, which the book
  driver and the chapter's first cell call right after this schema (a name close to ``auto``,
  ``wikitext-2`` or ``embedded`` that is no file is refused here, with the name meant).

:func:`moeaudit.tooling.badinputs.page` runs a list of bad inputs through the schema and through the
library functions that take the same values; ``python -m moeaudit.tooling.badinputs`` writes it to
``docs/bad_inputs.md`` (a test keeps that file current).

This module imports neither torch nor transformers; the few constants it shares with modules that
do (dtypes, text forms) are repeated here and checked equal by the tests, and the audited families
come from the registry (:mod:`moeaudit.families`, plain Python).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from ..families import FAMILIES, config_value, moe_layer_indices
from ..names import ABLATION_MODES as MODES
from ..names import CORPUS_CHOICES, CORPUS_TEXT_FORMS, DTYPES, TEXT_FORMS
from ..paths import refused_output_dir
from ..zoo import SHIPPED_MODELS, ZOO_DIR

#: fewest paired positions the per-cell statistics accept (:data:`moeaudit.stats.MIN_PAIRS`)
MIN_POSITIONS = 3
#: :data:`moeaudit.models.SUPPORTED_FAMILIES` (the registry :mod:`moeaudit.families` is plain Python)
SUPPORTED_FAMILIES = tuple(FAMILIES)
#: fewest bootstrap resamples: percentile intervals from fewer are mostly resampling noise
MIN_BOOT = 100

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ParameterError(ValueError, TypeError):
    """One or more parameters of a chapter are refused; the message is one line per chapter.

    Both a ``ValueError`` and a ``TypeError`` (a value of the wrong type is refused here too), so
    code that caught either from the library functions taking these values keeps working."""

    def __init__(self, stem: str, problems: list[str]):
        self.stem, self.problems = stem, list(problems)
        if len(self.problems) == 1:
            text = f"chapter {stem}: {self.problems[0]}"
        else:
            text = f"chapter {stem}: {len(self.problems)} parameters refused: " + " | ".join(self.problems)
        super().__init__(text)


# ----------------------------------------------------------------------------- shared definitions


def _allowed(text: str, **constraints) -> Any:
    """A field's constraints plus the sentence, shown in every message, that says what is allowed."""
    return Field(json_schema_extra={"allowed": text}, **constraints)


def _one_of(choices) -> str:
    """``a, b or c``."""
    return f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) > 1 else str(choices[0])


def _close(value, choices) -> str:
    """``; did you mean 'x'?`` for the closest of ``choices``, or ``""`` when none is close."""
    match = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def _read_config(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None


def _check_model_name(name: str) -> str:
    if not name.strip():
        raise ValueError("an empty model name")
    if name in SHIPPED_MODELS:
        missing = [f for f in ("config.json", "model.safetensors") if not (ZOO_DIR / name / f).is_file()]
        if missing:
            raise ValueError(f"the files of shipped model {name!r} are missing ({', '.join(missing)}); "
                             f"train it with: python -m moeaudit.tooling.training {name}")
        return name
    folder = Path(name).expanduser()
    if folder.is_dir():
        config = _read_config(folder)
        if config is None:
            raise ValueError(f"directory {name!r} has no readable config.json")
        family = config.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(f"{name!r} is a model_type={family!r} model, not one of the supported MoE families "
                             f"({', '.join(SUPPORTED_FAMILIES)})")
        return name
    if _HUB_ID.fullmatch(name):
        return name  # a Hugging Face id: checked when it is loaded
    raise ValueError(f"{name!r} is not a shipped model, an existing directory or a Hugging Face id (owner/name)"
                     f"{_close(name, SHIPPED_MODELS)}")


def _distinct(values: list) -> list:
    repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
    if repeated:
        raise ValueError(f"{', '.join(map(repr, repeated))} given more than once")
    return values


def _increasing(values: list) -> list:
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError("not in increasing order")
    return values


def _check_corpus(value):
    """A corpus name, or a path: a missing file is left to :func:`moeaudit.corpus.resolve_corpus`
    (which the book driver and the chapter's first cell call right after the schema), except when
    the value looks like a misspelt name."""
    text = os.fspath(value)
    if text in CORPUS_CHOICES:
        return value
    if not text.strip():
        raise ValueError("an empty name")
    if not Path(text).expanduser().exists() and _close(text, CORPUS_CHOICES):
        raise ValueError(f"{text!r} is not {_one_of(CORPUS_CHOICES)}, and no such "
                         f"file exists{_close(text, CORPUS_CHOICES)}")
    return value


def _check_data_dir(value):
    if value is not None and not Path(value).expanduser().is_dir():
        raise ValueError("no such directory")
    return value


def _check_results_dir(value):
    if value is None:
        return value
    path = Path(value).expanduser()
    if why := refused_output_dir(path):
        raise ValueError(why)
    if path.exists() and not path.is_dir():
        raise ValueError("it exists and is not a directory")
    existing = next(p for p in (path, *path.parents) if p.exists())  # the folder it would be created in
    if not existing.is_dir():
        raise ValueError(f"{existing} is a file, so the directory cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{existing} is not writable")
    return value


_SHIPPED = ", ".join(SHIPPED_MODELS)

ModelName = Annotated[str, AfterValidator(_check_model_name)]
Models = Annotated[list[ModelName], AfterValidator(_distinct), _allowed(
    f"a non-empty list of models, each a shipped name ({_SHIPPED}), a local directory with config.json or a Hugging "
    "Face id owner/name; one model is a one-element list, e.g. -p models '[\"tiny-olmoe\"]'", min_length=1)]
Layers = Annotated[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1), AfterValidator(_distinct)] | None,
                   _allowed("null (the chapter's default layers) or a non-empty list of MoE layer indices (>= 0, each "
                            "once) of every model, e.g. -p layers '[1, 3]'")]
NPositions = Annotated[int, _allowed(
    f"an integer >= {MIN_POSITIONS} (the paired t-test, the Wilcoxon test and the interval of d_z need at least "
    f"{MIN_POSITIONS} positions; at most the corpus's valid positions, checked once it is tokenized)", ge=MIN_POSITIONS)]
Seed = Annotated[int, _allowed("an integer from 0 to 2**63 - 1 (numpy's generator takes no negative seed; records "
                               "store it as a 64-bit integer)", ge=0, le=2**63 - 1)]
Mode = Annotated[Literal[MODES], _allowed(_one_of(MODES))]
Modes = Annotated[list[Literal[MODES]], AfterValidator(_distinct), _allowed(
    "both intervention definitions, each once, as a list: -p modes '[\"token\", \"sequence\"]'",
    min_length=2, max_length=2)]
Dtype = Annotated[Literal[DTYPES], _allowed(_one_of(DTYPES))]
Device = Annotated[str, _allowed("cpu, cuda, cuda:<index> or mps", pattern=r"^(cpu|cuda(:\d+)?|mps)$")]
NTexts = Annotated[int, _allowed("an integer >= 1 (at most the corpus's lines longer than 50 characters, checked "
                                 "when the corpus is read)", ge=1)]
MaxTokens = Annotated[Annotated[int, Field(ge=2)] | None, _allowed(
    "null (min(512, the model's context)) or an integer from 2 to the model's context (max_position_embeddings)")]
MinContext = Annotated[int, _allowed("an integer >= 0, below the text length (max_tokens) - 1", ge=0)]
BatchSize = Annotated[int, _allowed("an integer >= 2 (each ablation batch holds one clean row and at least one ablation)", ge=2)]
Level = Annotated[float, _allowed("a number strictly between 0 and 1", gt=0, lt=1)]
Power = Annotated[float, _allowed("a number strictly between 0 and 1", gt=0, lt=1)]
TostBound = Annotated[float, _allowed("a number > 0 (an equivalence bound in d_z units)", gt=0)]
NBoot = Annotated[int, _allowed(f"an integer >= {MIN_BOOT} (bootstrap resamples)", ge=MIN_BOOT)]
Corpus = Annotated[str | Path, AfterValidator(_check_corpus), _allowed(
    "auto, wikitext-2, embedded, or the path of a text file (one text per line)")]
TextForm = Annotated[Literal[TEXT_FORMS], _allowed(
    "auto (the corpus's own form), released, stripped, or wikitext (the embedded corpus only)")]
DataDir = Annotated[str | Path | None, AfterValidator(_check_data_dir), _allowed(
    "null ($MOEAUDIT_DATA_DIR) or an existing directory")]
ResultsDir = Annotated[str | Path | None, AfterValidator(_check_results_dir), _allowed(
    "null ($MOEAUDIT_RESULTS_DIR or results/) or a directory (created if missing)")]
REMOTE_ALLOWED = ("false (run here), true (NDIF at nnsight's configured host), local (nnsight's simulation of the "
                  "remote path on the local weights) or an NDIF host URL starting with http:// or https://")


def _check_remote(value):
    """``remote`` as :func:`moeaudit.models.check_remote` takes it (repeated here: this module imports no torch)."""
    if isinstance(value, bool) or value == "local" or (isinstance(value, str) and value.startswith(("http://", "https://"))):
        return value
    raise ValueError(f"not a valid value{_close(value, ('local', 'true', 'false', 'https://'))}")


Remote = Annotated[bool | str, AfterValidator(_check_remote), _allowed(REMOTE_ALLOWED)]
Positive = Annotated[float, _allowed("a number > 0", gt=0)]
Count = Annotated[int, _allowed("an integer >= 1", ge=1)]


# ----------------------------------------------------------------------------- config-only model checks


def config_layout(name: str) -> dict | None:
    """What the checks need from a model's ``config.json``, read without loading the model:
    ``family``, ``n_layers``, ``moe_layers``, ``top_k``, ``n_experts`` (routed) and ``context``
    (``max_position_embeddings`` or None). The MoE layers follow the family's rule in the registry
    (:func:`moeaudit.families.moe_layer_indices`, as :func:`moeaudit.models.layout_from_config` does). ``None`` for a
    Hugging Face id (not looked up), an unreadable config, or a config lacking a field the rule needs."""
    folder = ZOO_DIR / name if name in SHIPPED_MODELS else Path(name).expanduser()
    config = _read_config(folder) if folder.is_dir() else None
    if config is None:
        return None
    family = config.get("model_type")
    spec = FAMILIES.get(family)
    if spec is None:
        return None
    fields = SimpleNamespace(**config)
    try:
        n_layers = int(config["num_hidden_layers"])
        top_k = int(config_value(fields, spec.top_k_key))
        n_experts = int(config_value(fields, spec.num_experts_key))
        moe = list(moe_layer_indices(spec, fields, n_layers))
    except (AttributeError, KeyError, TypeError, ValueError):  # a field left to its class default: not checked here
        return None
    context = config.get("max_position_embeddings")
    return {"family": family, "n_layers": n_layers, "moe_layers": moe, "top_k": top_k, "n_experts": n_experts,
            "context": int(context) if isinstance(context, int) else None}


def _span(layers: list[int]) -> str:
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(map(str, layers))


def _refuse(param: str, reason: str) -> PydanticCustomError:
    return PydanticCustomError("parameter", "{reason}", {"param": param, "reason": reason})


# ----------------------------------------------------------------------------- chapter schemas


class ChapterParameters(BaseModel):
    """Base of the chapter schemas: strict types, no unknown names, and the checks across
    parameters (layers of every model, top-k, context, text index) for whichever of them a chapter has."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    #: chapters that compare the active experts of a token need at least this many of them
    min_top_k: ClassVar[int] = 1

    @model_validator(mode="after")
    def _across_parameters(self):
        fields = type(self).model_fields
        given = self.__dict__
        if given.get("seq_id") is not None and "n_texts" in fields and given["seq_id"] >= given["n_texts"]:
            raise _refuse("seq_id", f"there is no text {given['seq_id']} among n_texts={given['n_texts']} texts, "
                                    f"numbered 0 to {given['n_texts'] - 1}")
        if given.get("text_form", "auto") != "auto" and "corpus" in fields:
            corpus = os.fspath(given["corpus"])
            kind = corpus if corpus in CORPUS_TEXT_FORMS else ("file" if corpus not in CORPUS_CHOICES else None)
            if kind is not None and given["text_form"] not in CORPUS_TEXT_FORMS[kind]:  # "auto" is checked once read
                allowed = ", ".join(repr(f) for f in ("auto", *CORPUS_TEXT_FORMS[kind]))
                raise _refuse("text_form", f"the form {given['text_form']!r} does not exist for corpus={corpus!r}; "
                                           f"the forms of this corpus are {allowed}")
        if "half_dtype" in fields and given["half_dtype"] == given["dtype"]:
            raise _refuse("half_dtype", f"it equals dtype={given['dtype']!r}: the noise floor compares two precisions")
        if "operator_positions" in fields and given["operator_positions"] > given["n_positions"]:
            raise _refuse("operator_positions", f"it exceeds n_positions={given['n_positions']}: the operator comparison "
                                                "draws its positions from the chapter's positions")
        remote = given.get("remote", False)
        if remote is True or (isinstance(remote, str) and remote != "local"):
            for name in given.get("models") or []:
                if name in SHIPPED_MODELS or Path(name).expanduser().is_dir():
                    what = "a shipped model" if name in SHIPPED_MODELS else "a local directory"
                    raise _refuse("remote", f"remote={remote!r} runs every trace on a server, which runs only the "
                                            f"Hugging Face hub ids it hosts, and {name!r} is {what}; use remote=false to "
                                            "run it here or remote=local to simulate the remote path")
        for i, name in enumerate(given.get("models") or []):
            layout = config_layout(name)
            if layout is None:
                continue
            moe = layout["moe_layers"]
            if layout["top_k"] < self.min_top_k:
                raise _refuse("models", f"{name} routes each token to top-{layout['top_k']} expert(s); this chapter "
                                        f"compares active experts and needs top-k >= {self.min_top_k}")
            bad = [L for L in (given.get("layers") or []) if L not in moe]
            if bad:
                raise _refuse("layers", f"{_span(bad)} {'is not an MoE layer' if len(bad) == 1 else 'are not MoE layers'} "
                                        f"of {name}, whose MoE layers are {_span(moe)}")
            if i == 0 and given.get("layer") is not None and given["layer"] not in moe:
                raise _refuse("layer", f"{given['layer']} is not an MoE layer of {name}, whose MoE layers are {_span(moe)}")
            context = layout["context"]
            max_tokens = given.get("max_tokens")
            if max_tokens is not None and context is not None and max_tokens > context:
                raise _refuse("max_tokens", f"{name} has a context of {context} positions")
            length = max_tokens if max_tokens is not None else min(512, context or 512)
            if given.get("min_context", 0) > length - 2:
                raise _refuse("min_context", f"texts of {name} have at most {length} tokens, so no position has "
                                             f"{given['min_context']} tokens before it and a next token")
        return self


class _Models(ChapterParameters):
    """Fields of every chapter that loads models and reads the evaluation corpus."""

    models: Models
    dtype: Dtype
    device: Device
    remote: Remote
    n_texts: NTexts
    corpus: Corpus
    text_form: TextForm
    data_dir: DataDir
    results_dir: ResultsDir


class _Sampled(_Models):
    """... and samples token positions at audited layers."""

    layers: Layers
    n_positions: NPositions
    seed: Seed
    max_tokens: MaxTokens


class _Audited(_Sampled):
    """... and runs single-expert ablations in one mode."""

    min_top_k: ClassVar[int] = 2
    mode: Mode
    batch_size: BatchSize


class Introduction(_Models):
    """01_introduction."""

    layer: Annotated[Annotated[int, Field(ge=0)] | None, _allowed(
        "null (the model's last MoE layer) or an MoE layer of the first model")]
    seq_id: Annotated[int, _allowed("an integer >= 0, below n_texts", ge=0)]
    t: Annotated[Annotated[int, Field(ge=0)] | None, _allowed(
        "null (the middle of the text) or a position >= 0 (at most the text's length - 2, checked once it is tokenized)")]


class Verification(_Sampled):
    """02_verification."""

    mode: Mode
    seq_id: Annotated[Annotated[int, Field(ge=0)] | None, _allowed("null (the longest text) or an integer >= 0, below n_texts")]


class ObservationalMetrics(_Audited):
    """03_observational_metrics."""

    min_top_k: ClassVar[int] = 1
    alpha: Level
    released_pad_share: Annotated[float, _allowed("a number from 0 (inclusive) to 1 (exclusive)", ge=0, lt=1)]


class Audit(_Audited):
    """04_audit."""

    min_context: MinContext
    alpha: Level
    tost_bound_d: TostBound
    power: Power


class RoutingWeightControl(_Audited):
    """05_routing_weight_control."""

    min_context: MinContext
    alpha: Level
    power: Power
    n_boot: NBoot


class ProgressiveAblation(_Audited):
    """06_progressive_ablation."""

    min_context: MinContext
    alpha: Level
    cliff_threshold: Annotated[float, _allowed("a number > 0 (nats)", gt=0)]


class Mechanism(_Audited):
    """07_mechanism."""

    min_activations: Count


class ReleasedReanalysis(ChapterParameters):
    """08_released_reanalysis: the authors' released results, no model."""

    data_dir: DataDir
    results_dir: ResultsDir
    alpha: Level
    tost_bound_d: TostBound
    power: Power
    n_boot: NBoot
    seed: Seed


class InterventionDefinitions(_Sampled):
    """09_intervention_definitions."""

    min_top_k: ClassVar[int] = 2
    modes: Modes
    half_dtype: Annotated[Literal[DTYPES], _allowed(
        f"{_one_of(DTYPES)}, other than dtype")]
    operator_positions: Annotated[int, _allowed(
        f"an integer >= {MIN_POSITIONS}, at most n_positions (the positions of the operator comparison are drawn from "
        "the chapter's positions)", ge=MIN_POSITIONS)]
    batch_size: BatchSize
    alpha: Level
    n_boot: NBoot


class PredictorsAndPruning(_Audited):
    """10_predictors_and_pruning."""

    prune_fractions: Annotated[list[Annotated[float, Field(gt=0, lt=1)]], AfterValidator(_increasing), _allowed(
        "a non-empty list of increasing numbers strictly between 0 and 1, e.g. -p prune_fractions '[0.25, 0.5]'",
        min_length=1)]
    n_random_draws: Count
    ppl_texts: Count
    alpha: Level
    n_boot: NBoot
    per_layer_sweep: Annotated[bool, _allowed("true or false")]
    n_random_draws_per_layer: Count
    bf_prior_r: Annotated[float, _allowed("a number > 0 and <= 10 (scale of the Cauchy prior, in d_z units)", gt=0,
                                          le=10)]
    bf_prior_r_narrow: Annotated[float, _allowed("a number > 0 and <= 10 (scale of the Cauchy prior, in d_z units)",
                                                 gt=0, le=10)]


class Redundancy(_Audited):
    """11_redundancy: the routing settings of the models are compared, so at least two models."""

    models: Annotated[list[ModelName], AfterValidator(_distinct), _allowed(
        f"a list of at least two models that differ in routing (experts or top-k), each a shipped name ({_SHIPPED}), "
        "a local directory with config.json or a Hugging Face id", min_length=2)]
    min_context: MinContext
    alpha: Level

    @model_validator(mode="after")
    def _two_settings(self):
        layouts = [config_layout(m) for m in self.models]
        settings = {(lay["n_experts"], lay["top_k"]) for lay in layouts if lay is not None}
        if None not in layouts and len(settings) < 2:  # hub ids are not looked up: checked once loaded
            (E, k), = settings
            raise _refuse("models", f"every model routes to top-{k} of {E} experts; the chapter compares routing "
                                    "settings, so give models that differ in experts or top-k")
        return self


class NecessitySufficiency(_Sampled):
    """12_necessity_sufficiency: removal (token mode) against restoration in a corrupted run."""

    min_top_k: ClassVar[int] = 2
    batch_size: BatchSize
    span_tokens: Annotated[int, _allowed(
        "an integer >= 1: the tokens ending at t whose embeddings are corrupted; the span must lie in the text, so "
        "at most max_tokens - 1", ge=1)]
    corruption_scale: Annotated[float, _allowed(
        "a number > 0: the noise's standard deviation in standard deviations of the input embeddings (causal "
        "tracing uses 3); 0 corrupts nothing, so there is nothing to restore", gt=0)]
    min_gap: Annotated[float, _allowed(
        "a number > 0 (nats): positions whose corruption raises the loss by less are excluded from the recovered "
        "fraction", gt=0)]
    alpha: Level
    power: Power
    n_boot: NBoot

    @model_validator(mode="after")
    def _span_in_text(self):
        for name in self.models:
            layout = config_layout(name)
            if layout is None:
                continue
            context = layout["context"]
            length = self.max_tokens if self.max_tokens is not None else min(512, context or 512)
            if self.span_tokens > length - 1:
                raise _refuse("span_tokens", f"a span of {self.span_tokens} tokens ending at t lies outside every "
                                             f"text of {name} (at most {length} tokens, and t needs a next token), "
                                             f"so it must be at most {length - 1}")
        return self


class DefaultModels(ChapterParameters):
    """A1_default_models: model cards, so each model needs a training_summary.json."""

    models: Annotated[list[ModelName], AfterValidator(_distinct), _allowed(
        f"a non-empty list of shipped names ({_SHIPPED}) or directories holding a training_summary.json, e.g. "
        "-p models '[\"tiny-olmoe\"]'", min_length=1)]
    family: Annotated[list[ModelName], AfterValidator(_distinct), _allowed(
        "a list (possibly empty) of redundancy-family models: shipped names or directories holding a "
        "training_summary.json, e.g. -p family '[]'")]
    corpus: Corpus
    text_form: TextForm
    data_dir: DataDir
    results_dir: ResultsDir

    @field_validator("models", "family")
    @classmethod
    def _with_summary(cls, models: list[str]) -> list[str]:
        for name in models:
            folder = ZOO_DIR / name if name in SHIPPED_MODELS else Path(name).expanduser()
            if not (folder / "training_summary.json").is_file():
                raise ValueError(f"{name!r} has no training_summary.json: it is neither a shipped model nor a "
                                 "directory written by python -m moeaudit.tooling.training")
        return models


class CommandAModularity(ChapterParameters):
    """13_command_a_modularity: the released data of a modularity study (no model), and one shipped model's
    family ablations under two operators."""

    data_dir: DataDir
    results_dir: ResultsDir
    alpha: Level
    power: Power
    n_sim: Annotated[int, _allowed("an integer >= 1000 (Monte Carlo samples for the power of the exact rank test)",
                                   ge=1000)]
    seed: Seed
    models: Annotated[list[Literal[tuple(SHIPPED_MODELS)]], _allowed(  # type: ignore[valid-type]
        f"a one-element list holding a shipped model ({_SHIPPED}), e.g. -p models '[\"tiny-olmoe\"]'",
        min_length=1, max_length=1)]
    layer: Annotated[Annotated[int, Field(ge=0)] | None, _allowed(
        "null (the model's middle MoE layer) or an MoE layer of the model")]
    n_positions: NPositions
    n_null_draws: Annotated[int, _allowed("an integer >= 2 (random expert sets; the null band needs a spread)", ge=2)]
    batch_size: BatchSize


#: what appendix A2 reads from the chapter it describes
_DEPARTURE_NEEDS = {"models", "layers", "max_tokens", "mode", "dtype", "n_positions", "n_texts", "seed"}

SCHEMAS: dict[str, type[ChapterParameters]] = {
    "01_introduction": Introduction,
    "02_verification": Verification,
    "03_observational_metrics": ObservationalMetrics,
    "04_audit": Audit,
    "05_routing_weight_control": RoutingWeightControl,
    "06_progressive_ablation": ProgressiveAblation,
    "07_mechanism": Mechanism,
    "08_released_reanalysis": ReleasedReanalysis,
    "09_intervention_definitions": InterventionDefinitions,
    "10_predictors_and_pruning": PredictorsAndPruning,
    "11_redundancy": Redundancy,
    "12_necessity_sufficiency": NecessitySufficiency,
    "13_command_a_modularity": CommandAModularity,
    "A1_default_models": DefaultModels,
}
DEPARTURE_CHAPTERS = tuple(s for s, schema in SCHEMAS.items() if _DEPARTURE_NEEDS <= set(schema.model_fields))


class Departures(ChapterParameters):
    """A2_departures: the protocol of one chapter's default parameters against the paper's."""

    chapter: Annotated[Literal[DEPARTURE_CHAPTERS], _allowed(  # type: ignore[valid-type]
        f"a chapter with models, layers and positions: {', '.join(DEPARTURE_CHAPTERS)}")]
    corpus: Corpus
    data_dir: DataDir


SCHEMAS["A2_departures"] = Departures


# ----------------------------------------------------------------------------- validation and messages


def schema(stem: str) -> type[ChapterParameters]:
    """The schema of chapter ``stem``; ``ParameterError`` for an unknown chapter."""
    if stem not in SCHEMAS:
        raise ParameterError(stem, [_stop(f"no such chapter{_close(stem, SCHEMAS)}") + f" Chapters are {', '.join(SCHEMAS)}"])
    return SCHEMAS[stem]


def allowed(stem: str, name: str) -> str:
    """The sentence saying what parameter ``name`` of chapter ``stem`` accepts."""
    extra = schema(stem).model_fields[name].json_schema_extra or {}
    return extra.get("allowed", "")


def describe(stem: str) -> dict[str, str]:
    """Each parameter of chapter ``stem`` with what it accepts (``python -m moeaudit.tooling.book list``)."""
    return {name: allowed(stem, name) for name in schema(stem).model_fields}


def _stop(text: str) -> str:
    """``text`` ending as a sentence."""
    return text if text.endswith(("?", ".")) else text + "."


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, (str, Path)):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


_EXPECTED = {"int_type": "an integer", "float_type": "a number", "string_type": "a string", "list_type": "a list",
             "bool_type": "true or false", "is_instance_of": "a string"}


def _shown(value) -> str:
    return repr(str(value)) if isinstance(value, Path) else repr(value)


def _reason(name: str, err: dict) -> str:
    """Why pydantic refused parameter ``name`` (one error of ``ValidationError.errors()``), in words."""
    kind, ctx, loc, value = err["type"], err.get("ctx") or {}, err["loc"], err.get("input")
    item = f"item {_shown(value)} is " if len(loc) > 1 and isinstance(loc[1], int) else ""
    if kind == "list_type" and not item:
        return f"{_kind(value)}, not a list (one value is still a list: -p {name} '{json.dumps([value], default=str)}')"
    if kind in _EXPECTED:
        return f"{item}{_kind(value)}, not {_EXPECTED[kind]}"
    if kind == "greater_than_equal":
        return f"{item}below the minimum {ctx['ge']:g}"
    if kind == "greater_than":
        return f"{item}not above {ctx['gt']:g}"
    if kind == "less_than":
        return f"{item}not below {ctx['lt']:g}"
    if kind == "less_than_equal":
        return f"{item}above the maximum {ctx['le']:g}"
    if kind == "finite_number":
        return f"{item}not a finite number"
    if kind == "too_short":
        n = ctx.get("actual_length")
        return "empty" if n == 0 else f"{n} item{'' if n == 1 else 's'}, at least {ctx['min_length']} needed"
    if kind == "too_long":
        return f"{ctx.get('actual_length')} items, at most {ctx['max_length']} allowed"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return f"{item}not one of the allowed values{_close(value, choices)}"
    if kind == "string_pattern_mismatch":
        return f"{item}not of the allowed form"
    if kind == "value_error":  # raised by this module's checks, whose words name the item
        return str(ctx.get("error", err["msg"]))
    if kind == "parameter":
        return ctx["reason"]
    return f"{item}{err['msg']}"


def _problems(stem: str, model: type[ChapterParameters], values: dict, err: ValidationError) -> list[str]:
    fields = model.model_fields
    # named in the order the chapter's parameters cell gives them (``values`` keeps that order)
    ordered = [n for n in values if n in fields] + [n for n in fields if n not in values]
    unknown, problems, seen = [], [], set()
    for e in err.errors():
        name = e["loc"][0] if e["loc"] else (e.get("ctx") or {}).get("param", "?")
        if e["type"] == "extra_forbidden":
            unknown.append(_stop(f"{name} is unknown: the chapter has no parameter of that name{_close(name, fields)}")
                           + f" Its parameters are {', '.join(ordered)}")
            continue
        if name in seen:  # one message per parameter (a union reports each of its alternatives)
            continue
        seen.add(name)
        if e["type"] == "missing":
            problems.append(f"{name} is not defined (the parameters cell of {stem} sets it)")
            continue
        problems.append(f"{name}={_shown(values.get(name))} is refused: {_stop(_reason(name, e))} "
                        f"Allowed: {allowed(stem, name)}")
    return unknown + problems


def validate(stem: str, values: Mapping[str, Any]) -> ChapterParameters:
    """Check the parameters of chapter ``stem`` against its schema and return them validated.

    ``values`` holds every parameter of the chapter (defaults with overrides applied); a name the
    chapter does not have is refused. A notebook passes ``globals()``: a mapping with ``__name__``
    is read as a namespace, from which only the chapter's parameters are taken.

    Raises :class:`ParameterError` (a ``ValueError``) whose message names the chapter, each
    refused parameter, the value given and what is allowed.
    """
    model = schema(stem)
    values = dict(values)
    if "__name__" in values:  # a notebook's globals()
        values = {k: values[k] for k in model.model_fields if k in values}
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise ParameterError(stem, _problems(stem, model, values, err)) from None
