"""The evaluation corpus (WikiText-2) and the seeded position sampler.

The corpus is read from a local directory when one is given (``data_dir`` or
``$MOEAUDIT_DATA_DIR``); both the tokenized release (``test.txt``/``valid.txt``/``train.txt``)
and the raw release (``wiki.test.raw`` ...) are accepted. Without a local copy it is
loaded from the Hugging Face hub (``Salesforce/wikitext``, ``wikitext-2-raw-v1``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .paths import DATA_DIR_ENV, data_dir as resolve_data_dir

SPLITS = ("train", "validation", "test")
_LOCAL_NAMES = {
    "train": ("train.txt", "wiki.train.raw", "wiki.train.tokens"),
    "validation": ("valid.txt", "validation.txt", "wiki.valid.raw", "wiki.valid.tokens"),
    "test": ("test.txt", "wiki.test.raw", "wiki.test.tokens"),
}
HUB_DATASET = ("Salesforce/wikitext", "wikitext-2-raw-v1")


def _local_file(split: str, root: Path) -> Path | None:
    for folder in (root / "wikitext-2", root / "wikitext-2-raw", root):
        for name in _LOCAL_NAMES[split]:
            if (folder / name).is_file():
                return folder / name
    return None


def load_wikitext2(split: str = "test", *, data_dir: str | Path | None = None) -> list[str]:
    """Lines of one WikiText-2 split (unstripped, as distributed; empty lines included)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    root = resolve_data_dir(data_dir)
    if root is not None:
        path = _local_file(split, root)
        if path is not None:
            return path.read_text(encoding="utf-8").splitlines()
    try:
        import datasets  # noqa: PLC0415

        ds = datasets.load_dataset(*HUB_DATASET, split=split)
        return list(ds["text"])
    except Exception as exc:  # offline, hub unreachable, or datasets missing
        where = f" (looked in {root})" if root is not None else ""
        raise FileNotFoundError(
            f"WikiText-2 split {split!r} not found locally{where} and could not be loaded from the hub "
            f"{HUB_DATASET[0]}/{HUB_DATASET[1]} ({type(exc).__name__}). Put test.txt/valid.txt (or "
            f"wiki.test.raw/wiki.valid.raw) in <dir>/wikitext-2/ and set ${DATA_DIR_ENV}=<dir> or pass data_dir=<dir>."
        ) from None


def select_texts(lines: list[str], *, n_texts: int = 100, min_chars: int = 50) -> list[str]:
    """The paper's text selection: the first ``n_texts`` lines longer than ``min_chars`` characters."""
    if n_texts < 1:
        raise ValueError(f"n_texts must be >= 1, got {n_texts}")
    chosen = [ln.strip() for ln in lines if len(ln.strip()) > min_chars][:n_texts]
    if len(chosen) < n_texts:
        raise ValueError(f"n_texts={n_texts} but only {len(chosen)} lines are longer than {min_chars} characters")
    return chosen


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
        """Right-padded ``(input_ids, attention_mask)`` LongTensors for the given sequences."""
        import torch  # noqa: PLC0415

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
        import hashlib  # noqa: PLC0415

        h = hashlib.sha256()
        for s in self.sequences:
            h.update(s.tobytes())
            h.update(b"|")
        return h.hexdigest()[:16]


def load_eval_corpus(tokenizer, *, n_texts: int = 100, max_tokens: int = 512, min_chars: int = 50,
                     split: str = "test", data_dir: str | Path | None = None) -> TokenizedCorpus:
    """The paper's evaluation corpus: first ``n_texts`` test lines longer than ``min_chars``, tokenized."""
    texts = select_texts(load_wikitext2(split, data_dir=data_dir), n_texts=n_texts, min_chars=min_chars)
    return TokenizedCorpus.from_texts(texts, tokenizer, max_tokens=max_tokens, split=split, n_texts=n_texts, min_chars=min_chars)


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
