"""Bad inputs and what they get: the page ``docs/bad_inputs.md``.

Two tables, both computed when the page is written (``python -m moeaudit.tooling.badinputs``) and
checked by the test suite against the committed file:

* **Chapter parameters** (:data:`BAD_INPUTS`): each bad ``-p`` value, the chapter schema's
  message (:mod:`moeaudit.tooling.params`) and what the library function taking the same value does
  when called directly, without the schema.
* **Library calls** (:func:`library_cases`): bad indices, unsupported settings and the inputs
  that used to give a wrong number without an error (offloaded weights, a resumed record store
  with another chunk size, a clean pass that disagrees with the routing of the ablating
  forward), each run on a tiny random model, with what happens now.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .. import corpus as C
from .. import engine, paths, stats
from .. import engine as E
from .. import models as M
from .. import released as R
from ..audit import model_fingerprint, paired_cells, prepare
from ..chapters import restoration
from ..engine import clean_pass
from ..metrics import METRICS, pruning_criteria
from ..models import wrap_model
from ..paths import REPO_ROOT
from ..pruning import pruned_experts
from ..store import ChunkMismatchWarning, cached_records
from .book import _parse_params, notebook_parameters
from .params import ParameterError, validate
from .testing import random_token_corpus, save_tiny_checkpoint, tiny_random_model

#: where ``python -m moeaudit.tooling.badinputs`` writes :func:`page`
BAD_INPUTS_PAGE = "docs/bad_inputs.md"

#: (chapter, parameter, the -p value as typed, library calls that take the same value: see _library_call[,
#: other (parameter, value) pairs given before it])
BAD_INPUTS = [
    ("04_audit", "n_positions", "2", "positions paired_effect"),
    ("04_audit", "n_positions", "abc", "positions"),
    ("04_audit", "n_positions", "0", "positions"),
    ("04_audit", "n_positions", "2.0", None),
    ("04_audit", "n_position", "5", None),
    ("04_audit", "models", "tiny-olmoe", "load_each"),
    ("04_audit", "models", "[]", None),
    ("04_audit", "models", '["tiny-olmo"]', None),
    ("04_audit", "models", '["tiny-olmoe", "tiny-olmoe"]', None),
    ("04_audit", "layers", "3", None),
    ("04_audit", "layers", "[8]", "check_layer"),
    ("04_audit", "layers", "[-1]", "check_layer"),
    ("04_audit", "layers", "[]", None),
    ("04_audit", "seed", "-1", "positions_seed"),
    ("04_audit", "mode", "tokens", None),
    ("04_audit", "dtype", "float64", "load_model"),
    ("04_audit", "device", "gpu", None),
    ("04_audit", "remote", "gpu", "load_model_remote"),
    ("04_audit", "remote", "true", "load_model_remote"),
    ("04_audit", "remote", "ftp://ndif.example", "load_model_remote"),
    ("04_audit", "n_texts", "0", "select_texts"),
    ("04_audit", "max_tokens", "1", "from_texts"),
    ("04_audit", "max_tokens", "1000", None),
    ("04_audit", "min_context", "-1", "valid_positions"),
    ("04_audit", "min_context", "200", None),
    ("04_audit", "batch_size", "0", None),
    ("04_audit", "batch_size", "1", None),
    ("04_audit", "alpha", "0", None),
    ("04_audit", "alpha", "1", None),
    ("04_audit", "alpha", "0.05%", None),
    ("04_audit", "power", "1.5", None),
    ("04_audit", "tost_bound_d", "0", None),
    ("04_audit", "corpus", "wikitxt-2", "resolve_corpus"),
    ("04_audit", "text_form", "raw", "select_texts_form"),
    ("04_audit", "text_form", "wikitext", "resolve_text_form", (("corpus", "wikitext-2"),)),
    ("04_audit", "data_dir", "/nonexistent/moeaudit-data", "data_dir"),
    ("04_audit", "results_dir", "lib/moeaudit/zoo/tiny-olmoe", "results_dir"),
    ("04_audit", "results_dir", "/", "results_dir"),
    ("01_introduction", "layer", "9", None),
    ("01_introduction", "seq_id", "10", None),
    ("03_observational_metrics", "released_pad_share", "1", None),
    ("05_routing_weight_control", "n_boot", "10", None),
    ("06_progressive_ablation", "cliff_threshold", "0", None),
    ("07_mechanism", "min_activations", "0", None),
    ("09_intervention_definitions", "modes", "token", None),
    ("09_intervention_definitions", "modes", '["token", "token"]', None),
    ("09_intervention_definitions", "half_dtype", "float32", None),
    ("09_intervention_definitions", "operator_positions", "2", None),
    ("09_intervention_definitions", "operator_positions", "500", None),
    ("10_predictors_and_pruning", "prune_fractions", "[0.5, 0.25]", None),
    ("10_predictors_and_pruning", "prune_fractions", "[0, 0.5]", None),
    ("10_predictors_and_pruning", "per_layer_sweep", "1", None),
    ("11_redundancy", "models", '["olmoe-e64-k8-s0"]', None),
    ("11_redundancy", "models", '["olmoe-e64-k8-s0", "olmoe-e64-k3-s0"]', None),
    ("11_redundancy", "models", '["olmoe-e64-k8-s0", "olmoe-e64-k8-s1"]', None),
    ("12_necessity_sufficiency", "corruption_scale", "0", "corruption_scale"),
    ("12_necessity_sufficiency", "corruption_scale", "-3", "corruption_scale"),
    ("12_necessity_sufficiency", "span_tokens", "0", "span_tokens"),
    ("12_necessity_sufficiency", "span_tokens", "128", "span_tokens"),
    ("12_necessity_sufficiency", "min_gap", "0", "min_gap"),
    ("A1_default_models", "models", '["allenai/OLMoE-1B-7B-0924"]', None),
    ("A1_default_models", "family", '["olmoe-e64-k8-s2"]', None),
    ("A2_departures", "chapter", "04-audit", None),
]


def _library_call(kind: str, value) -> tuple[str, str]:
    """Call the library function that takes ``value`` for this kind of input, directly (no schema).
    Returns (the call, what happened: ``accepted`` or the exception)."""
    import numpy as np  # noqa: PLC0415


    tiny = C.TokenizedCorpus.from_token_ids([np.arange(12)] * 3)
    lines = ["a line of more than fifty characters, as the text selection asks for it"] * 5
    calls = {
        "positions": (f"corpus.sample_positions(corpus, n={value!r}, seed=42)",
                      lambda: C.sample_positions(tiny, n=value, seed=42)),
        "positions_seed": (f"corpus.sample_positions(corpus, n=5, seed={value!r})",
                           lambda: C.sample_positions(tiny, n=5, seed=value)),
        "valid_positions": (f"corpus.valid_positions(corpus, min_context={value!r})",
                            lambda: C.valid_positions(tiny, min_context=value)),
        "select_texts": (f"corpus.select_texts(lines, n_texts={value!r})", lambda: C.select_texts(lines, n_texts=value)),
        "select_texts_form": (f"corpus.select_texts(lines, text_form={value!r})",
                              lambda: C.select_texts(lines, text_form=value)),
        "from_texts": (f"corpus.TokenizedCorpus.from_texts(texts, tokenizer, max_tokens={value!r})",
                       lambda: C.TokenizedCorpus.from_texts(["x"], None, max_tokens=value)),
        "resolve_corpus": (f"corpus.resolve_corpus({value!r})", lambda: C.resolve_corpus(value)),
        "resolve_text_form": (f"corpus.resolve_text_form('wikitext-2', {value!r})",
                              lambda: C.resolve_text_form("wikitext-2", value)),
        "data_dir": (f"paths.data_dir({value!r})", lambda: paths.data_dir(value)),
        "results_dir": (f"paths.results_dir({value!r})", lambda: paths.results_dir(value)),
    }
    if kind == "paired_effect":

        return (f"stats.paired_effect(high, low) on {value} pairs",
                _outcome(lambda: stats.paired_effect(np.arange(value) + 1.0, np.zeros(value))))
    if kind in ("corruption_scale", "span_tokens", "min_gap"):
        import pandas as pd  # noqa: PLC0415


        at_t5 = pd.DataFrame({"seq_id": [0], "t": [5]})
        calls.update({
            "corruption_scale": (f"engine.check_corruption_scale({value!r}) (run_restorations checks it first)",
                                 lambda: engine.check_corruption_scale(value)),
            "span_tokens": (f"chapters.restoration.restoration_requests(clean, positions at t=5, layers, "
                            f"span_tokens={value!r})",
                            lambda: restoration.restoration_requests(None, at_t5, [], span_tokens=value)),
            "min_gap": (f"chapters.restoration.recovered_fraction(clean, corrupt, restored, min_gap={value!r})",
                        lambda: restoration.recovered_fraction([1.0], [2.0], [1.5], min_gap=value)),
        })
    if kind in ("load_model", "load_model_remote", "load_each", "check_layer"):

        if kind == "load_model_remote":
            calls[kind] = (f"models.load_model('tiny-olmoe', remote={value!r})",
                           lambda: M.load_model("tiny-olmoe", remote=value))
        elif kind == "load_model":
            calls[kind] = (f"models.load_model('tiny-olmoe', dtype={value!r})",
                           lambda: M.load_model("tiny-olmoe", dtype=value))
        elif kind == "load_each":  # what iterating a string over models does
            calls[kind] = (f"models.load_model({value[0]!r}, local_files_only=True) (the first item of the string)",
                           lambda: M.load_model(value[0], local_files_only=True))
        else:
            from transformers import AutoConfig  # noqa: PLC0415

            layout = M.layout_from_config(AutoConfig.from_pretrained(M.resolve_model_path("tiny-olmoe")))
            calls[kind] = (f"MoELayout.check_layer({value[0]!r}) (tiny-olmoe)", lambda: layout.check_layer(value[0]))
    call, fn = calls[kind]
    return call, _outcome(fn)


def _outcome(fn) -> str:
    import warnings  # noqa: PLC0415

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fn()
    except Exception as exc:  # noqa: BLE001 - the table shows whatever the library raises
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if hasattr(result, "columns") and "reason" in result.columns:
        return f"accepted; returns a row whose reason is {str(result['reason'].iloc[0])!r}"
    if isinstance(result, str):
        return f"accepted; {result}"
    return "accepted"


def parameter_table() -> str:
    """A markdown table: each input of :data:`BAD_INPUTS`, the schema's message for it (given by
    ``python -m moeaudit.tooling.book chapter`` and by the chapter's first cell, :mod:`moeaudit.tooling.params`),
    and what the library function that takes the same value does when called directly.
    It is the first part of :func:`page`."""

    rows = ["## Chapter parameters", "",
            "Every input below is refused by the chapter's schema (`moeaudit.tooling.params`) before any work, both by "
            "`python -m moeaudit.tooling.book chapter <chapter> -p ...` and by the chapter's first cell under papermill or "
            "Jupyter. The last column shows what the library does with the same value when it is called directly, "
            "without the schema: `accepted` means the value goes through and fails later or silently.", "",
            "| input | chapter | message | library, called directly |", "|---|---|---|---|"]
    defaults: dict[str, dict] = {}
    for stem, name, raw, kind, *with_params in BAD_INPUTS:  # with_params: other -p pairs given with it
        pairs = [*(with_params[0] if with_params else ()), (name, raw)]
        given = _parse_params(pairs)
        defaults.setdefault(stem, notebook_parameters(stem))
        try:
            validate(stem, {**defaults[stem], **given})
            message = "accepted (this input should have been refused)"
        except ParameterError as err:
            message = str(err)
        library = "; ".join(f"`{call}`: {outcome}" for call, outcome in
                            (_library_call(k, given[name]) for k in (kind or "").split()))
        shown = " ".join(f"-p {n} {r}" for n, r in pairs)
        rows.append(f"| `{shown}` | {stem} | {_cell(message)} | {_cell(library)} |")
    return "\n".join(rows) + "\n"


def _tiny():
    import torch  # noqa: PLC0415


    torch.manual_seed(0)
    model = tiny_random_model("olmoe", seed=2, num_experts=8, top_k=3)
    corpus = random_token_corpus(n_seqs=3, length=16, seed=5)
    return model, corpus, clean_pass(model, corpus, progress=False)


def _request(clean, *, seq_id=0, t=3, layer=0, removed=None):
    import pandas as pd  # noqa: PLC0415

    removed = [int(clean.active(seq_id, t, layer)[0])] if removed is None else removed
    return pd.DataFrame({"seq_id": [seq_id], "t": [t], "layer": [layer], "removed": [removed]})


def library_cases() -> list[tuple[str, object]]:
    """(the call, a function running it) for every library-level bad input of the page. The
    functions share one tiny random OLMoE (3 layers, 8 experts, top-3) and a random-token corpus of
    three texts (16, 13 and 10 tokens)."""
    import copy  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    import pandas as pd  # noqa: PLC0415
    import torch  # noqa: PLC0415


    model, corpus, clean = _tiny()
    n1 = int(corpus.lengths[1])

    def run(req, **kw):
        return E.run_ablations(model, corpus, clean, req, progress=False, **kw)

    def linear_attention():
        m = tiny_random_model("qwen2_moe", seed=1)  # a family that reads one mask per layer type
        c = E.clean_pass(m, corpus, progress=False)
        m.hf.config.layer_types = ["linear_attention", "full_attention", "full_attention"]
        return E.run_ablations(m, corpus, c, _request(c, layer=1), strategy="kv", progress=False)

    def flash():
        m = copy.deepcopy(model)
        m.hf.config._attn_implementation = "flash_attention_2"
        return E.run_ablations(m, corpus, clean, _request(clean), strategy="kv", progress=False)

    def disagreeing_clean_pass():
        wrong = copy.deepcopy(clean)
        routed = set(clean.active(0, 3, 1).tolist())
        stranger = next(e for e in range(8) if e not in routed)
        wrong.routing[1]["indices"][clean.row(0, 3)][0] = stranger
        rec = E.run_ablations(model, corpus, wrong, _request(wrong, layer=1, removed=[stranger]), progress=False)
        r = rec.iloc[0]
        return (f"the record is flagged: premise_ok={bool(r.premise_ok)}, removed_routed={int(r.removed_routed)}, "
                f"clean_routing_match={bool(r.clean_routing_match)} (delta_loss={r.delta_loss:g} is not an effect)")

    def resumed_store():
        items = list(range(18))

        def compute(chunk):
            return pd.DataFrame({"item": chunk, "chunk_len": len(chunk)})

        done = []  # chunks computed before the interruption

        def interrupted(chunk):
            if len(done) == 3:
                raise KeyboardInterrupt
            done.append(chunk)
            return compute(chunk)

        with tempfile.TemporaryDirectory() as tmp:
            try:
                cached_records("demo", {"p": 1}, [items[i:i + 2] for i in range(0, 18, 2)], interrupted,
                               results_dir=tmp, progress=False)
            except KeyboardInterrupt:
                pass
            resumed, _ = cached_records("demo", {"p": 1}, [items[i:i + 8] for i in range(0, 18, 8)], compute,
                                        results_dir=tmp, progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            fresh, _ = cached_records("demo", {"p": 1}, [items[i:i + 8] for i in range(0, 18, 8)], compute,
                                      results_dir=tmp, progress=False)
        return f"{len(resumed)} rows, identical to an uninterrupted run: {resumed.equals(fresh)}"

    def offloaded():
        from accelerate import cpu_offload  # noqa: PLC0415
        from transformers import AutoModelForCausalLM  # noqa: PLC0415

        with tempfile.TemporaryDirectory() as tmp:
            save_tiny_checkpoint(model, tmp)
            hf = AutoModelForCausalLM.from_pretrained(tmp)
        cpu_offload(hf)
        off = E.clean_pass(wrap_model(hf, name="offloaded"), corpus, progress=False)
        worst = max(float(np.abs(off.routing[L]["norm"] - clean.routing[L]["norm"]).max()) for L in clean.routing)
        return f"expert-output norms equal to the plain load's (largest difference {worst:g})"

    def stray_window():
        m = tiny_random_model("olmoe", seed=2, num_experts=8, top_k=3, sliding_window=4)
        c = E.clean_pass(m, corpus, progress=False)
        req = pd.concat([_request(c, seq_id=0, t=t) for t in (2, 9, 13)], ignore_index=True)
        kv, full = (E.run_ablations(m, corpus, c, req, strategy=s, progress=False) for s in ("kv", "full"))
        return (f"the key is ignored, as OLMoE's attention ignores it: kv and full agree within 1e-5 nats: "
                f"{bool((kv.delta_loss - full.delta_loss).abs().max() < 1e-5)}")

    def swapped_experts():
        m = copy.deepcopy(model)
        ex = m.hf.model.layers[1].mlp.experts
        with torch.no_grad():
            ex.gate_up_proj[[0, 1]] = ex.gate_up_proj[[1, 0]].clone()
            ex.down_proj[[0, 1]] = ex.down_proj[[1, 0]].clone()
        return f"the fingerprint changes: {model_fingerprint(m) != model_fingerprint(model)}"

    def rounding_cell():
        low = np.random.default_rng(0).normal(1.0, 0.2, 30).astype(np.float32)
        high = (low + np.float32(0.1)).astype(np.float32)
        return stats.paired_effect(high.astype(np.float64), low.astype(np.float64), precision="float32")

    def swapped_chunk():
        import tempfile  # noqa: PLC0415
        import warnings  # noqa: PLC0415

        def compute(chunk):
            return pd.DataFrame({"item": chunk, "value": [10 * i for i in chunk]})

        with tempfile.TemporaryDirectory() as tmp:
            chunks = [[0, 1], [2, 3]]
            _, st = cached_records("demo", {"x": 1}, chunks, compute, results_dir=tmp, progress=False)
            a, b = st.chunk_ids
            st.chunk_path(b).write_bytes(st.chunk_path(a).read_bytes())
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                df, _ = cached_records("demo", {"x": 1}, chunks, compute, results_dir=tmp, progress=False)
        n = sum(issubclass(w.category, ChunkMismatchWarning) for w in caught)
        return (f"the file is recomputed, not served ({n} ChunkMismatchWarning: it holds another chunk); "
                f"rows {len(df)}, duplicated items {int(df.item.duplicated().sum())}")

    def form_feed_file():
        import tempfile  # noqa: PLC0415

        with tempfile.TemporaryDirectory() as tmp:
            f = Path(tmp) / "texts.txt"
            f.write_text("A first text long enough to be read as one\x0cwith a form feed inside it.\n"
                         "A second text\u2028with a line separator.\nA third\x85text.\n", encoding="utf-8")
            return f"read as {len(C.resolve_corpus(str(f)).lines)} texts (one per line feed)"

    def premise_pairs():
        rec = pd.DataFrame([{"model": "m", "family": "olmoe", "mode": "token", "layer": 0, "seq_id": 0, "t": t,
                             "expert": e, "prob": p, "weight": p, "delta_loss": 0.1 * t, "gap_norm": 1.0,
                             "clean_loss": 3.0, "premise_ok": t != 1} for t in range(4) for e, p in ((0, .7), (1, .3))])
        met = pd.DataFrame({"layer": [0, 0], "expert": [0, 1], **{m: [2.0, 1.0] for m in METRICS}})
        table = stats.audit_table(paired_cells(rec, met, rankings=["routing_weight"]), by=("model", "ranking", "layer"),
                                  high_col="delta_loss_high", low_col="delta_loss_low")
        return f"the cell keeps 3 of 4 pairs: n = {int(table.n.iloc[0])}, n_premise_excluded = {int(table.n_premise_excluded.iloc[0])}"

    def top1_pairs():
        rec = pd.DataFrame([{"model": "m", "family": "olmoe", "mode": "token", "layer": 0, "seq_id": 0, "t": t,
                             "expert": t % 2, "prob": 1.0, "weight": 1.0, "delta_loss": 0.1, "gap_norm": 1.0,
                             "clean_loss": 3.0, "premise_ok": True} for t in range(4)])
        met = pd.DataFrame({"layer": [0, 0], "expert": [0, 1], **{m: [2.0, 1.0] for m in METRICS}})
        return paired_cells(rec, met)

    def llama4_nope():
        m = tiny_random_model("llama4_text", n_layers=3, seed=1, no_rope_layers=[0, 0, 0], attn_temperature_tuning=True)
        c = E.clean_pass(m, corpus, progress=False)
        return E.run_ablations(m, corpus, c, _request(c, layer=1), strategy="kv", progress=False)

    def error_page_download():
        import io  # noqa: PLC0415
        import tempfile  # noqa: PLC0415

        rel, saved = R.RELEASED_FILES[0], R._urlopen
        R._urlopen = lambda url, timeout=None: io.BytesIO(b"<html>Access denied</html>")
        try:
            with tempfile.TemporaryDirectory() as tmp:
                R._download(rel, Path(tmp) / "f.json")
        finally:
            R._urlopen = saved

    def too_long():
        return prepare("tiny-olmoe", corpus="embedded", max_tokens=200)

    def yaml_error():
        return _parse_params([("n_positions", "[1, 2")])

    def large_values():
        rng = np.random.default_rng(0)
        row = stats.paired_effect(1000.0 + rng.normal(1e-4, 1e-4, 200), np.full(200, 1000.0)).iloc[0]
        return f"tested: d_z = {row.cohens_dz:.2f}, reason {row.reason!r}"

    def spearman_large():
        rng = np.random.default_rng(0)
        x = rng.normal(size=100_000)
        return f"interval: {stats.spearman(x, x + rng.normal(size=x.size)).ci_method.iloc[0]}"

    return [
        ("store: a chunk file overwritten by another valid chunk of the same run", swapped_chunk),
        ("corpus.resolve_corpus(file) on a file of 3 lines holding a form feed, U+2028 and U+0085", form_feed_file),
        ("audit.prepare('tiny-olmoe', corpus='embedded', max_tokens=200) (context 128)", too_long),
        ("stats.paired_effect on 200 float64 pairs 1000 + N(1e-4, 1e-4) against 1000", large_values),
        ("audit.paired_cells + stats.audit_table where one of 4 positions failed its premise", premise_pairs),
        ("audit.paired_cells on a top-1 model's records", top1_pairs),
        ("engine.run_ablations(strategy='kv') on Llama 4 with NoPE layers and attention-temperature tuning",
         llama4_nope),
        ("released: a download answered with an error page (status 200)", error_page_download),
        ("stats.spearman with its interval on 100,000 pairs", spearman_large),
        ("book: -p n_positions '[1, 2' (a YAML syntax error)", yaml_error),
        (f"CleanPass.active(1, {n1}, 0) (text 1 has {n1} tokens)", lambda: clean.active(1, n1, 0)),
        ("CleanPass.row(-1, 0)", lambda: clean.row(-1, 0)),
        ("CleanPass.routing_frame(7)", lambda: clean.routing_frame(7)),
        ("TokenizedCorpus.padded([-1])", lambda: corpus.padded([-1])),
        ("metrics.pruning_criteria(clean, num_experts=8, renormalize=False, seq_ids=[0, 5])",
         lambda: pruning_criteria(clean, num_experts=8, renormalize=False, seq_ids=[0, 5])),
        ("engine.run_ablations on the last token of a text (no next token)",
         lambda: run(_request(clean, t=int(corpus.lengths[0]) - 1, removed=[0]))),
        ("engine.run_ablations removing an expert not routed at t",
         lambda: run(_request(clean, removed=[next(e for e in range(8) if e not in clean.active(0, 3, 0))]))),
        ("engine.run_ablations(batch_size=1)", lambda: run(_request(clean), batch_size=1)),
        ("engine.run_ablations(removed=[-1], require_active=False)",
         lambda: run(_request(clean, removed=[-1]), require_active=False)),
        ("engine.run_ablations(scale=1.0) (keeps the whole contribution)", lambda: run(_request(clean), scale=1.0)),
        ("engine.run_ablations(strategy='kv') on an OLMoE config with a stray sliding_window=4", stray_window),
        ("engine.run_ablations(strategy='kv') on a model with a linear-attention layer", linear_attention),
        ("engine.run_ablations(strategy='kv') with attn_implementation='flash_attention_2'", flash),
        ("engine.trace_ablation(model, ids, layer=0, experts=[1], t=2, mode='tokens')",
         lambda: E.trace_ablation(model, corpus.sequences[0], layer=0, experts=[1], t=2, mode="tokens")),
        ("engine.premise_failures(records without the premise columns)",
         lambda: E.premise_failures(pd.DataFrame({"model": ["m"], "layer": [0]}))),
        ("pruning.pruned_experts(model, {0: [0, 1, 2, 3, 4, 5]}) (leaves 2 of 8 experts, top-3)",
         lambda: pruned_experts(model, {0: [0, 1, 2, 3, 4, 5]}).__enter__()),
        ("stats.paired_effect(high, low, n_tests=0)",
         lambda: stats.paired_effect(np.arange(5.0), np.zeros(5), n_tests=0)),
        ("stats.paired_effect on five pairs whose differences are all equal",
         lambda: stats.paired_effect(np.arange(5.0) + 1, np.arange(5.0))),
        ("stats.paired_effect on 30 float32 pairs whose differences are 0.1 up to rounding", rounding_cell),
        ("audit.model_fingerprint after swapping two experts (every tensor keeps its shape and sum)",
         swapped_experts),
        ("a clean pass that disagrees with the routing of the ablating forward (a near-tie rounded the other "
         "way in reduced precision)", disagreeing_clean_pass),
        ("store.cached_records interrupted after three chunks of 2 items, resumed with chunks of 8", resumed_store),
        ("engine.clean_pass on a model whose weights are offloaded (accelerate.cpu_offload)", offloaded),
    ]


def library_table() -> str:
    """The second part of :func:`page`: each of :func:`library_cases` and what it gets now."""
    rows = ["## Library calls", "",
            "Each call below runs on a tiny random OLMoE (3 layers, 8 experts, top-3) and random-token texts. "
            "An error is shown as its type and first line; `accepted` means the call returns, with what it "
            "returns where that is the point.", "",
            "| call | what it gets |", "|---|---|"]
    for call, fn in library_cases():
        outcome = _outcome(fn)
        rows.append(f"| {_cell(call)} | {_cell(outcome)} |")
    return "\n".join(rows) + "\n"


def page() -> str:
    """The whole page: title, :func:`parameter_table` and :func:`library_table`."""
    head = ["# Bad inputs and what they get", "",
            "Generated by `python -m moeaudit.tooling.badinputs` (module `moeaudit.tooling.badinputs`); the test suite fails "
            "when this file is out of date.", ""]
    return "\n".join(head) + "\n" + parameter_table() + "\n" + library_table()


def write_page(root: Path = REPO_ROOT) -> Path:
    """Write :func:`page` to ``<root>/docs/bad_inputs.md``; returns the path."""
    target = Path(root) / BAD_INPUTS_PAGE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page())
    return target


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


if __name__ == "__main__":
    print(f"wrote {write_page()}")
