"""Shared names and constants: the metric keys and their labels, the ablation modes and strategies,
the dtypes, the corpus choices and text forms. Plain Python (no torch): the parameter schemas, the
presentation layer and the library read them from here, so each is defined once.
"""

from __future__ import annotations

#: the ablation modes: ``"token"`` removes the expert at the audited token only (the paper's
#: definition); ``"sequence"`` at every position of the prefix (the released code's)
ABLATION_MODES = ("token", "sequence")
#: how an ablation row is computed: from the clean key/value cache (``"kv"``), by re-running the
#: prefix (``"full"``), or the first that the model supports (``"auto"``)
STRATEGIES = ("kv", "full", "auto")
#: the floating-point formats a model can be loaded in (``dtype`` parameter)
DTYPES = ("float32", "bfloat16", "float16")


METRICS = ("utilization_rate", "activation_norm", "mean_routing_weight", "activation_std")


ROUTING_WEIGHT = "routing_weight"  # the per-token control ranking (g_e(x_t) at the audited token)


RANKINGS = METRICS + (ROUTING_WEIGHT,)


METRIC_LABELS = {"utilization_rate": "Utilization rate", "activation_norm": "Activation norm",
                 "mean_routing_weight": "Mean routing weight", "activation_std": "Activation std",
                 ROUTING_WEIGHT: "Per-token routing weight"}


#: the named choices of the ``corpus`` parameter (anything else is read as a file path)
CORPUS_CHOICES = ("auto", "wikitext-2", "embedded")


#: how a selected line becomes a text (the ``text_form`` parameter):
#:
#: ``"released"``
#:     the line as the corpus serves it: WikiText-2's lines start with a space and end with a line
#:     break, and the released code feeds them so;
#: ``"stripped"``
#:     the line without its surrounding whitespace;
#: ``"wikitext"``
#:     the embedded corpus only: each paragraph written in WikiText-2's tokenized form, the form the
#:     shipped models were trained on (:func:`wikitext_form`), and served as WikiText-2 serves its
#:     lines (leading space, line break);
#: ``"auto"``
#:     ``"wikitext"`` for the embedded corpus, ``"released"`` for WikiText-2 and for a file.
TEXT_FORMS = ("auto", "released", "stripped", "wikitext")
#: the forms that exist for each kind of corpus (``CorpusSource.name``), the first being ``"auto"``'s choice
CORPUS_TEXT_FORMS = {"embedded": ("wikitext", "released", "stripped"),
                     "wikitext-2": ("released", "stripped"),
                     "file": ("released", "stripped")}
