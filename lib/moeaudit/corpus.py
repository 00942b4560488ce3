"""The evaluation corpus and the seeded position sampler.

Which text the audit reads is the ``corpus`` parameter (every chapter has it):

``"auto"`` (default)
    WikiText-2 (the paper's corpus) when it is found locally or can be loaded from the hub,
    otherwise the embedded corpus. The fallback is reported: :func:`resolve_corpus` issues a
    :class:`CorpusFallbackWarning` and the returned :class:`CorpusSource` says why.
``"wikitext-2"``
    WikiText-2 or a :class:`FileNotFoundError` that says where it was looked for.
``"embedded"``
    Original prose written for this project and shipped with the package
    (``moeaudit/data/embedded_corpus.txt``, one paragraph per line; see its data card
    ``EMBEDDED_CORPUS.md``). It makes the book executable anywhere; its numbers are
    illustrative, not the paper's.
a path
    A plain-text file (UTF-8) with one text per line.

WikiText-2 is read from a local directory when one is given (``data_dir`` or
``$MOEAUDIT_DATA_DIR``, folder ``wikitext-2/``); both the tokenized release
(``test.txt``/``valid.txt``/``train.txt`` or ``wiki.*.tokens``: ``wikitext-2-v1``, with ``<unk>``)
and the raw release (``wiki.test.raw`` ...: ``wikitext-2-raw-v1``) are accepted, and the variant
read is recorded. Without a local copy it is loaded from the Hugging Face hub
(``Salesforce/wikitext``, ``wikitext-2-raw-v1``, the release the paper used). WikiText-2's text is
never copied into this repository.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .names import CORPUS_CHOICES, CORPUS_TEXT_FORMS, TEXT_FORMS
from .paths import DATA_DIR_ENV
from .paths import data_dir as resolve_data_dir

SPLITS = ("train", "validation", "test")
_LOCAL_NAMES = {
    "train": ("train.txt", "wiki.train.raw", "wiki.train.tokens"),
    "validation": ("valid.txt", "validation.txt", "wiki.valid.raw", "wiki.valid.tokens"),
    "test": ("test.txt", "wiki.test.raw", "wiki.test.tokens"),
}
HUB_DATASET = ("Salesforce/wikitext", "wikitext-2-raw-v1")

#: the embedded corpus shipped as package data (one paragraph per line)
EMBEDDED_CORPUS = Path(__file__).resolve().parent / "data" / "embedded_corpus.txt"
#: version of the embedded corpus; part of every record-cache key that uses it
EMBEDDED_VERSION = "embedded-v1"
#: the two releases of WikiText-2 (hub configuration names)
WIKITEXT_TOKENIZED, WIKITEXT_RAW = "wikitext-2-v1", "wikitext-2-raw-v1"


class CorpusFallbackWarning(UserWarning):
    """``corpus="auto"`` could not find WikiText-2 and uses the embedded corpus instead."""


@dataclass(frozen=True)
class CorpusSource:
    """The text an audit reads, and where it came from.

    ``name`` is ``"wikitext-2"``, ``"embedded"`` or ``"file"``; ``variant`` identifies the text
    without naming a machine-specific path (``"wikitext-2-v1"``/``"wikitext-2-raw-v1"`` for
    WikiText-2, :data:`EMBEDDED_VERSION`, or ``"sha256:<16 hex>"`` of a file's content);
    ``origin`` says where it was read (a path or the hub id); ``requested`` is the parameter
    value; ``fallback_reason`` is set when ``"auto"`` fell back to the embedded corpus. ``lines``
    are the file's lines as read (unstripped; empty lines included).
    """

    name: str
    variant: str
    origin: str
    requested: str
    split: str = "test"
    fallback_reason: str | None = None
    lines: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @property
    def is_paper_corpus(self) -> bool:
        """Whether this is WikiText-2, the corpus of the paper (Section 2)."""
        return self.name == "wikitext-2"

    def key(self) -> dict:
        """What identifies the text in a record-cache key and in ``params.json``."""
        return {"corpus_source": self.name, "corpus_variant": self.variant}

    def describe(self) -> str:
        """One line naming the corpus, its variant and where it was read."""
        if self.name == "wikitext-2":
            release = ("tokenized release, rare words replaced by an unknown-word token" if self.variant == WIKITEXT_TOKENIZED
                       else "raw release, the paper's")
            return f"WikiText-2 {self.split} split ({self.variant}, {release}) from {self.origin}"
        if self.name == "embedded":
            n = sum(1 for ln in self.lines if ln.strip())
            return f"the embedded corpus ({EMBEDDED_VERSION}, {n} paragraphs of original prose) from {self.origin}"
        return f"the file {self.origin} ({self.variant})"


def _local_file(split: str, root: Path) -> Path | None:
    for folder in (root / "wikitext-2", root / "wikitext-2-raw", root):
        for name in _LOCAL_NAMES[split]:
            if (folder / name).is_file():
                return folder / name
    return None


def _local_variant(path: Path, lines: list[str]) -> str:
    """Which WikiText-2 release a local file holds: the tokenized one has ``<unk>`` and ``@-@``."""
    if path.name.endswith(".raw"):
        return WIKITEXT_RAW
    if path.name.endswith(".tokens"):
        return WIKITEXT_TOKENIZED
    sample = "\n".join(lines[:5000])
    return WIKITEXT_TOKENIZED if ("<unk>" in sample or " @-@ " in sample) else WIKITEXT_RAW


def _hub_offline_mode() -> bool:
    """Whether the Hugging Face libraries are told to work from their local cache only."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


_HUB_PROBE: dict[str, bool] = {}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub's host (``$HF_ENDPOINT``, default huggingface.co), remembered
    for the process. Without it an unreachable hub costs ~25 s of retries inside ``datasets``
    before the fallback; with ``HF_HUB_OFFLINE=1`` the probe is skipped and ``datasets`` reads
    its local cache."""
    import socket  # noqa: PLC0415
    from urllib.parse import urlsplit  # noqa: PLC0415

    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    key = f"{host}:{port}"
    if key not in _HUB_PROBE:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            _HUB_PROBE[key] = True
        except OSError:
            _HUB_PROBE[key] = False
    return _HUB_PROBE[key]


def _load_wikitext2(split: str, data_dir) -> tuple[list[str], str, str]:
    """(lines, variant, origin) of one WikiText-2 split, or FileNotFoundError."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    root = resolve_data_dir(data_dir)
    if root is not None:
        path = _local_file(split, root)
        if path is not None:
            lines = split_lines(path.read_bytes().decode("utf-8-sig"))
            return lines, _local_variant(path, lines), str(path)
    try:
        if not _hub_offline_mode() and not _hub_reachable():
            raise ConnectionError("the hub is unreachable")
        import datasets  # noqa: PLC0415

        ds = datasets.load_dataset(*HUB_DATASET, split=split)
        return list(ds["text"]), WIKITEXT_RAW, f"the hub ({HUB_DATASET[0]}, {HUB_DATASET[1]})"
    except Exception as exc:  # offline, hub unreachable, or datasets missing
        where = f" (looked in {root})" if root is not None else f" (no data directory: ${DATA_DIR_ENV} is unset)"
        raise FileNotFoundError(
            f"WikiText-2 split {split!r} not found locally{where} and could not be loaded from the hub "
            f"{HUB_DATASET[0]}/{HUB_DATASET[1]} ({type(exc).__name__}). Put test.txt/valid.txt (or "
            f"wiki.test.raw/wiki.valid.raw) in <dir>/wikitext-2/ and set ${DATA_DIR_ENV}=<dir> or pass data_dir=<dir>."
        ) from None


def load_wikitext2(split: str = "test", *, data_dir: str | Path | None = None) -> list[str]:
    """Lines of one WikiText-2 split (unstripped, as distributed; empty lines included).

    Raises ``ValueError`` for an unknown split and ``FileNotFoundError`` (with instructions)
    when the split is neither found locally nor loadable from the hub.
    """
    return _load_wikitext2(split, data_dir)[0]


def split_lines(text: str) -> list[str]:
    """The lines of a text file: split at each ``\\n`` (a ``\\r`` before it is part of the line break),
    and nowhere else (files are decoded from bytes, without Python's newline translation, which would
    also split at a lone ``\\r``; a UTF-8 byte-order mark is dropped). ``str.splitlines`` would also split at form feeds, U+2028, U+0085 and other
    separators, which can occur inside a text. A final line break ends the last line.

    >>> split_lines("one\\x0ctext\\r\\ntwo\\u2028texts\\n")
    ['one\\x0ctext', 'two\\u2028texts']
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def check_context(max_tokens: int, context: int | None, model: str = "the model", *, what: str | None = None) -> None:
    """Refuse texts longer than the model's context: ``ValueError`` when ``max_tokens`` exceeds
    ``context`` (``max_position_embeddings``; ``None``: unknown, nothing is checked). Positions past
    the context are not positions the model was built for, so the audit does not measure them; the
    place where texts are tokenized for a model (:func:`moeaudit.audit.prepare`) and every pass over a
    tokenized corpus call it; ``what`` names the length checked in the message (default ``max_tokens=N``)."""
    if context is not None and max_tokens > int(context):
        raise ValueError(f"{what or f'max_tokens={max_tokens}'} exceeds the context of {model} (max_position_embeddings="
                         f"{int(context)}): texts would be measured at positions the model was not built for; "
                         f"use max_tokens <= {int(context)}")


def _read_text_file(path: Path, what: str) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"{what}: no such file {str(path)!r}")
    if not path.is_file():
        raise ValueError(f"{what}: {str(path)!r} is not a file (give a plain-text file with one text per line)")
    try:
        lines = split_lines(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what}: {str(path)!r} is not UTF-8 text ({exc})") from None
    if not any(ln.strip() for ln in lines):
        raise ValueError(f"{what}: {str(path)!r} is empty (it needs one text per line)")
    return lines


def resolve_corpus(corpus: str | os.PathLike = "auto", *, split: str = "test",
                   data_dir: str | Path | None = None) -> CorpusSource:
    """Find the text named by the ``corpus`` parameter (see the module docstring).

    Returns a :class:`CorpusSource`. Raises ``TypeError`` if ``corpus`` is not a string or path,
    ``FileNotFoundError`` for ``"wikitext-2"`` when WikiText-2 is unavailable or for a path that
    does not exist, ``ValueError`` for an empty or non-text file, or for ``split`` other than
    ``"test"`` with the embedded corpus or a file (they hold one set of texts). With
    ``"auto"``, falling back to the embedded corpus issues a :class:`CorpusFallbackWarning`.
    """
    if not isinstance(corpus, (str, os.PathLike)) or (isinstance(corpus, str) and not corpus.strip()):
        raise TypeError(f"corpus={corpus!r}: expected one of {CORPUS_CHOICES} or the path of a text file")
    requested = os.fspath(corpus)
    if requested in ("auto", "wikitext-2"):
        try:
            lines, variant, origin = _load_wikitext2(split, data_dir)
            return CorpusSource("wikitext-2", variant, origin, requested, split, None, tuple(lines))
        except FileNotFoundError as exc:
            if requested == "wikitext-2":
                raise FileNotFoundError(f"corpus='wikitext-2': {exc}") from None
            reason = str(exc).split(". Put ")[0]
        source = _embedded(requested, split, reason)
        warnings.warn(f"corpus='auto': {reason}; using {source.describe()} instead (numbers are illustrative, "
                      "not the paper's)", CorpusFallbackWarning, stacklevel=2)
        return source
    if requested == "embedded":
        return _embedded(requested, split, None)
    path = Path(requested).expanduser()
    if split != "test":
        raise ValueError(f"corpus={requested!r} holds one set of texts; split={split!r} applies only to WikiText-2")
    lines = _read_text_file(path, f"corpus={requested!r}")
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
    return CorpusSource("file", f"sha256:{digest}", str(path.resolve()), requested, split, None, tuple(lines))


def _embedded(requested: str, split: str, reason: str | None) -> CorpusSource:
    if split != "test":
        raise ValueError(f"the embedded corpus holds one set of evaluation texts; split={split!r} applies only to WikiText-2")
    lines = _read_text_file(EMBEDDED_CORPUS, "the embedded corpus (package data)")
    return CorpusSource("embedded", EMBEDDED_VERSION, "the moeaudit package", requested, split, reason, tuple(lines))


#: capitalised words of the embedded corpus written ``<unk>`` in its WikiText form (see :func:`derive_unk_words`)
EMBEDDED_UNK_WORDS = EMBEDDED_CORPUS.with_name("embedded_corpus_unk.txt")
UNK_TOKEN = "<unk>"


def resolve_text_form(source: "CorpusSource | str", text_form: str = "auto") -> str:
    """The form in which the texts of ``source`` are read: ``text_form`` checked against the forms
    that exist for that corpus (:data:`CORPUS_TEXT_FORMS`), with ``"auto"`` replaced by the corpus's
    own form (``"wikitext"`` for the embedded corpus, else ``"released"``).

    ``source``: a :class:`CorpusSource` or its ``name`` (``"embedded"``, ``"wikitext-2"``, ``"file"``).
    ``ValueError`` naming the parameter, the corpus and the allowed forms when the form does not exist
    for it (``"wikitext"`` for WikiText-2, which is already in that form, or for a file).
    """
    name = source.name if isinstance(source, CorpusSource) else str(source)
    if name not in CORPUS_TEXT_FORMS:
        raise ValueError(f"unknown corpus kind {name!r}: expected one of {tuple(CORPUS_TEXT_FORMS)}")
    allowed = CORPUS_TEXT_FORMS[name]
    if text_form == "auto":
        return allowed[0]
    if text_form not in allowed:
        what = source.describe() if isinstance(source, CorpusSource) else f"a {name} corpus"
        why = {"wikitext-2": " (WikiText-2 is read as released: its tokenized release is that form already)",
               "file": " (a file is read as written)"}.get(name, "") if text_form == "wikitext" else ""
        raise ValueError(f"text_form={text_form!r} does not exist for {what}{why}; the forms allowed for this corpus "
                         f"are {', '.join(repr(f) for f in ('auto', *allowed))}")
    return text_form


_NUMBER_SEP = re.compile(r"(?<=\d)([,.])(?=\d)")
_WORD_HYPHEN = re.compile(r"(?<=[A-Za-z0-9])-(?=[A-Za-z0-9])")
_CLITIC = re.compile(r"(?<=[A-Za-z])('t|'s|'re|'ve|'ll|'d|'m)\b", re.IGNORECASE)
_PLURAL_POSSESSIVE = re.compile(r"(?<=s)'(?=\s|$)")
_PUNCT = re.compile(r"([,.;:!?()\[\]\"%$–—])")
_WORD = re.compile(r"[A-Za-z]+")


def wikitext_form(text: str, unk_words=frozenset()) -> str:
    """One paragraph of ordinary orthography written in WikiText-2's tokenized form (Merity et al.,
    2016, the release the shipped models were trained on), without its leading space and line break.

    The conventions are WikiText-2's: punctuation, brackets, quotes, ``%``, ``$`` and dashes are
    separate tokens (``"sea , and"``); a hyphen between letters or digits is ``@-@``
    (``"crown @-@ mark"``), a thousands separator ``@,@`` and a decimal point ``@.@``
    (``"1 @,@ 000"``, ``"3 @.@ 5"``); clitics are split (``"planet 's"``, ``"didn 't"``,
    ``"workers '"``); every whole word in ``unk_words`` is written ``<unk>``, as WikiText writes the
    words outside its vocabulary. Tokens are separated by single spaces.

    >>> wikitext_form("The crown-mark (1,000 grains, 3.5%) was Odric's.", {"Odric"})
    "The crown @-@ mark ( 1 @,@ 000 grains , 3 @.@ 5 % ) was <unk> 's ."
    """
    s = _NUMBER_SEP.sub(lambda m: f" @{m.group(1)}@ ", text.strip())
    s = _WORD_HYPHEN.sub(" @-@ ", s)
    s = _CLITIC.sub(r" \1", s)
    s = _PLURAL_POSSESSIVE.sub(" '", s)
    # punctuation, except the '@,@' and '@.@' markers made above
    s = re.sub(r"(?<!@)([,.])(?!@)", r" \1 ", s)
    s = _PUNCT.sub(lambda m: m.group(1) if m.group(1) in ",." else f" {m.group(1)} ", s)
    if unk_words:
        s = _WORD.sub(lambda m: UNK_TOKEN if m.group(0) in unk_words else m.group(0), s)
    return " ".join(s.split())


def derive_unk_words(corpus_lines, training_lines) -> list[str]:
    """The words of ``corpus_lines`` that the WikiText form writes as ``<unk>``: capitalised words
    (letters only) that occur in ``training_lines`` neither as written nor in lower case.

    ``training_lines`` are the text the shipped models were trained on (WikiText-2's validation
    split): a capitalised word outside it is a name the models have never seen, mostly one invented
    for the embedded corpus, which WikiText itself would have replaced by ``<unk>``. Ordinary words
    that are capitalised only at the start of a sentence are kept whenever their lower-case form was
    seen. Returns the sorted list of distinct words.
    """
    seen = set()
    for ln in training_lines:
        seen.update(ln.split())
    seen_lower = {w.lower() for w in seen}
    words = {w for ln in corpus_lines for w in _WORD.findall(ln)}
    return sorted(w for w in words if w[0].isupper() and w not in seen and w.lower() not in seen_lower)


def embedded_unk_words() -> frozenset[str]:
    """The shipped list behind the embedded corpus's WikiText form (:data:`EMBEDDED_UNK_WORDS`; lines
    starting with ``#`` are its provenance). Rebuilt from the data by ``python -m moeaudit.corpus
    unk-words`` and checked identical by the tests when WikiText-2 is present."""
    lines = EMBEDDED_UNK_WORDS.read_text(encoding="utf-8").split("\n")
    return frozenset(ln.strip() for ln in lines if ln.strip() and not ln.startswith("#"))


def select_texts(lines: list[str], *, n_texts: int = 100, min_chars: int = 50, text_form: str = "released") -> list[str]:
    """The paper's text selection: the first ``n_texts`` lines longer than ``min_chars`` characters
    (counted without surrounding whitespace; paper, Section 2).

    ``text_form="released"`` returns each line as the corpus serves it, ending with its line break
    (restored when the file was read line by line), which is how the released code feeds the hub's
    lines to the tokenizer; ``"stripped"`` strips surrounding whitespace; ``"wikitext"`` writes each
    selected line in WikiText-2's tokenized form (:func:`wikitext_form`, with the embedded corpus's
    ``<unk>`` list) served as WikiText-2's lines are (``" " + text + " \\n"``). The selection is the
    same in every form. ``ValueError`` for ``n_texts < 1``, an unknown ``text_form`` (``"auto"``
    must be resolved first: :func:`resolve_text_form`) or too few lines.
    """
    if n_texts < 1:
        raise ValueError(f"n_texts must be >= 1, got {n_texts}")
    if text_form not in TEXT_FORMS or text_form == "auto":
        raise ValueError(f"text_form={text_form!r} is not one of {TEXT_FORMS[1:]}"
                         + (" (resolve 'auto' for a corpus with resolve_text_form)" if text_form == "auto" else ""))
    chosen = [ln for ln in lines if len(ln.strip()) > min_chars][:n_texts]
    if len(chosen) < n_texts:
        raise ValueError(f"n_texts={n_texts} but only {len(chosen)} lines are longer than {min_chars} characters")
    if text_form == "stripped":
        return [ln.strip() for ln in chosen]
    if text_form == "wikitext":
        unk = embedded_unk_words()
        return [f" {wikitext_form(ln, unk)} \n" for ln in chosen]
    return [ln if ln.endswith("\n") else ln + "\n" for ln in chosen]


@dataclass
class TokenizedCorpus:
    """Token-id sequences (unpadded), one per text. ``seq_id`` is the index in ``sequences``."""

    sequences: list[np.ndarray]
    texts: list[str] | None = None
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_texts(cls, texts: list[str], tokenizer, *, max_tokens: int = 512, **meta) -> "TokenizedCorpus":
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        seqs = [np.asarray(tokenizer(t, truncation=True, max_length=max_tokens)["input_ids"], dtype=np.int64) for t in texts]
        return cls(seqs, list(texts), {"max_tokens": max_tokens, **meta})

    @classmethod
    def from_token_ids(cls, sequences, **meta) -> "TokenizedCorpus":
        return cls([np.asarray(s, dtype=np.int64) for s in sequences], None, dict(meta))

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(s) for s in self.sequences], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sequences)

    def padded(self, seq_ids, *, pad_id: int = 0, length: int | None = None):
        """Right-padded ``(input_ids, attention_mask)`` LongTensors (len(seq_ids), width) for the given
        sequences; ``width`` is ``length`` or the longest selected sequence (longer ones are cut).
        ``IndexError`` for a sequence id outside ``[0, len(self))`` (negative ids do not wrap);
        ``TypeError`` for ids that are not integers (see :func:`integer_ids`); ``ValueError`` for no
        ids or ``length < 1``."""
        import torch  # noqa: PLC0415

        seq_ids = integer_ids(seq_ids, "seq_ids")
        if not seq_ids:
            raise ValueError("seq_ids is empty")
        bad = [i for i in seq_ids if not 0 <= i < len(self.sequences)]
        if bad:
            raise IndexError(f"sequence id(s) {bad[:5]} out of range: the corpus has {len(self.sequences)} sequences "
                             f"(ids 0..{len(self.sequences) - 1})")
        if length is not None and (not is_integer(length) or length < 1):
            raise ValueError(f"length must be an integer >= 1, got {length!r}")
        seqs = [self.sequences[i] for i in seq_ids]
        width = length or max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            n = min(len(s), width)
            ids[row, :n] = torch.from_numpy(s[:n])
            mask[row, :n] = 1
        return ids, mask

    def to_frame(self) -> pd.DataFrame:
        """One row per sequence with its token ids: enough to re-run any ablation by hand."""
        return pd.DataFrame({"seq_id": np.arange(len(self)), "n_tokens": self.lengths,
                             "token_ids": [s.tolist() for s in self.sequences]})

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for s in self.sequences:
            h.update(s.tobytes())
            h.update(b"|")
        return h.hexdigest()[:16]


def is_integer(x) -> bool:
    """Whether ``x`` is an integer (Python or NumPy), booleans excluded."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def integer_ids(values, name: str) -> list[int]:
    """``values`` as a list of Python ints, refusing what would be coerced silently: a string
    (``"12"`` is not ids 1 and 2), floats (``1.7``), booleans, and non-integer items.
    ``TypeError`` naming ``name`` and the first offending item."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a sequence of integer ids, got {values!r}")
    out = []
    for v in values:
        if not is_integer(v):
            raise TypeError(f"{name} must hold integer ids, got {v!r} ({type(v).__name__})")
        out.append(int(v))
    return out


def load_eval_corpus(tokenizer, *, corpus: str | os.PathLike | CorpusSource = "auto", n_texts: int = 100,
                     max_tokens: int = 512, min_chars: int = 50, split: str = "test", text_form: str = "auto",
                     data_dir: str | Path | None = None) -> TokenizedCorpus:
    """The paper's evaluation corpus: the first ``n_texts`` lines longer than ``min_chars``
    characters (:func:`select_texts`, in ``text_form``), tokenized and truncated to ``max_tokens``
    (paper, Section 2).

    ``corpus`` is the parameter value or an already resolved :class:`CorpusSource`; its
    :meth:`CorpusSource.key` and the resolved ``text_form`` (:func:`resolve_text_form`) are stored in
    ``meta`` (and so in every record-cache key). Raises as :func:`resolve_corpus` does, ``ValueError``
    for a ``text_form`` that does not exist for the corpus, and ``ValueError`` naming ``corpus``
    when it has fewer than ``n_texts`` long enough lines.
    """
    source = corpus if isinstance(corpus, CorpusSource) else resolve_corpus(corpus, split=split, data_dir=data_dir)
    text_form = resolve_text_form(source, text_form)
    try:
        texts = select_texts(list(source.lines), n_texts=n_texts, min_chars=min_chars, text_form=text_form)
    except ValueError as exc:
        raise ValueError(f"corpus={source.requested!r} ({source.describe()}): {exc}") from None
    return TokenizedCorpus.from_texts(texts, tokenizer, max_tokens=max_tokens, split=source.split, n_texts=n_texts,
                                      min_chars=min_chars, text_form=text_form, **source.key())


def in_sample_unigram_loss(target_ids) -> float:
    """Mean loss (nats per token) of the unigram model fitted to the very tokens it is scored on.

    ``target_ids``: the predicted tokens (1-D integers; negative ids, such as the ``-1`` that marks a
    text's last token in a clean pass, are ignored). With counts c_v over the N targets,
    ``-(1/N) * sum_v c_v * log(c_v / N)``: the entropy of the targets' empirical distribution, the
    best loss any model that ignores context can reach on these tokens. A language model's gain over
    it measures what the model takes from context on this text. ``ValueError`` for no target.

    >>> round(in_sample_unigram_loss([1, 1, 2, 3]), 4)  # -(2 ln 0.5 + 2 ln 0.25) / 4
    1.0397
    """
    ids = np.asarray(target_ids).ravel()
    ids = ids[ids >= 0]
    if ids.size == 0:
        raise ValueError("in_sample_unigram_loss needs at least one target token")
    counts = np.unique(ids, return_counts=True)[1].astype(np.float64)
    n = counts.sum()
    return float(-(counts * np.log(counts / n)).sum() / n)


#: below this gain over the in-sample unigram (nats per token) a model takes little from context on the
#: text it is read on, and the pages say so (:func:`loss_regime`)
NEAR_UNIGRAM_GAIN = 0.5
#: a model within this many nats per token of a uniform guess over its vocabulary has learnt nothing of the text
CHANCE_MARGIN = 0.5
#: below this many scored tokens per vocabulary entry the in-sample unigram fits its few tokens closely and
#: understates a unigram model's loss (its entropy estimate is biased low), so the gain is understated
SMALL_SAMPLE_PER_TYPE = 2


def loss_regime(target_ids, losses, vocab_size: int) -> dict:
    """How well a model reads a text: its mean loss against the two baselines that ignore context.

    ``target_ids`` (N,) the predicted tokens and ``losses`` (N,) the model's loss on each, nats
    (rows with a negative target id or a non-finite loss, such as a text's last token, are left out);
    ``vocab_size`` V. Returns ``mean_loss``; ``unigram_loss`` (:func:`in_sample_unigram_loss` of the
    same targets); ``uniform_loss`` = ln V; ``gain`` = unigram_loss - mean_loss (what the model takes
    from context on this text); ``n_tokens``; ``vocab_size``; ``small_sample`` = fewer than
    :data:`SMALL_SAMPLE_PER_TYPE` scored tokens per vocabulary entry (the in-sample unigram then
    understates a unigram model's loss, and the gain with it); ``near_unigram`` = gain < :data:`NEAR_UNIGRAM_GAIN`;
    ``above_chance`` = mean_loss < uniform_loss - :data:`CHANCE_MARGIN`. ``ValueError`` for
    ``vocab_size < 2``, unequal lengths or no scored token.

    >>> r = loss_regime([1, 1, 2, 3, -1], [0.5, 0.5, 1.0, 1.0, float("nan")], 8)
    >>> round(r["unigram_loss"], 4), r["mean_loss"], round(r["gain"], 4), r["near_unigram"]
    (1.0397, 0.75, 0.2897, True)
    """
    ids = np.asarray(target_ids).ravel()
    loss = np.asarray(losses, dtype=np.float64).ravel()
    if ids.shape != loss.shape:
        raise ValueError(f"target_ids and losses differ in length: {ids.size} and {loss.size}")
    keep = (ids >= 0) & np.isfinite(loss)
    if vocab_size < 2 or not keep.any():
        raise ValueError(f"need vocab_size >= 2 and at least one scored token, got {vocab_size} and {int(keep.sum())}")
    mean, unigram, uniform = float(loss[keep].mean()), in_sample_unigram_loss(ids[keep]), float(np.log(vocab_size))
    n = int(keep.sum())
    return {"mean_loss": mean, "unigram_loss": unigram, "uniform_loss": uniform, "gain": unigram - mean,
            "n_tokens": n, "vocab_size": int(vocab_size), "small_sample": n < SMALL_SAMPLE_PER_TYPE * vocab_size,
            "near_unigram": bool(unigram - mean < NEAR_UNIGRAM_GAIN),
            "above_chance": bool(mean < uniform - CHANCE_MARGIN)}


def valid_positions(corpus: TokenizedCorpus, *, min_context: int = 0) -> pd.DataFrame:
    """All (seq_id, t) whose next token exists: t in [min_context, len - 2]. Padding never appears
    because sequences are stored unpadded."""
    if min_context < 0:
        raise ValueError(f"min_context must be >= 0, got {min_context}")
    rows = [(i, t) for i, n in enumerate(corpus.lengths) for t in range(min_context, int(n) - 1)]
    return pd.DataFrame(rows, columns=["seq_id", "t"]).astype("int64")


def sample_positions(corpus: TokenizedCorpus, *, n: int, seed: int, min_context: int = 0) -> pd.DataFrame:
    """``n`` distinct positions drawn without replacement with ``numpy.random.default_rng(seed)``.

    Returns a frame with ``seq_id``, ``t``, ``token_id`` (x_t) and ``target_id`` (x_{t+1}),
    sorted by (seq_id, t) so that positions of one sequence are processed together.
    """
    if not is_integer(seed) or seed < 0:  # None would draw new positions at every call, under one cache key
        raise ValueError(f"seed must be an integer >= 0, got {seed!r} (positions are drawn reproducibly from it)")
    if not is_integer(n):
        raise TypeError(f"n_positions must be an integer, got {n!r}")
    pool = valid_positions(corpus, min_context=min_context)
    if n < 1 or n > len(pool):
        raise ValueError(f"n_positions={n} is out of range: {len(pool)} valid positions are available "
                         f"(min_context={min_context}); choose 1 <= n_positions <= {len(pool)}")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(pool), size=n, replace=False))
    out = pool.iloc[pick].sort_values(["seq_id", "t"]).reset_index(drop=True)
    out["token_id"] = [int(corpus.sequences[s][t]) for s, t in zip(out.seq_id, out.t)]
    out["target_id"] = [int(corpus.sequences[s][t + 1]) for s, t in zip(out.seq_id, out.t)]
    return out
