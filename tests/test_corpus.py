"""The ``corpus`` parameter: WikiText-2, the embedded corpus, a text file; fallback and errors."""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

import moeaudit.models  # noqa: F401  (nnsight before transformers.models.*)
from moeaudit import audit, corpus as C, report
from moeaudit.tooling import book
from moeaudit.zoo import zoo_path

TOKENIZED = [" = Title = ", "", " The river @-@ side town had 1 @,@ 200 <unk> residents and a mill on the bank .", ""]
RAW = [" = Title = ", "", " The river-side town had 1,200 residents in 1900 and a mill on the bank of the river.", ""]


@pytest.fixture
def no_hub(monkeypatch):
    """No local WikiText-2 and no hub: what a fresh machine without network sees."""
    monkeypatch.delenv("MOEAUDIT_DATA_DIR", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(C, "_hub_reachable", lambda timeout=3.0: False)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(zoo_path("tiny-olmoe"))


def _embedded_paragraphs():
    return [ln for ln in C.EMBEDDED_CORPUS.read_text(encoding="utf-8").splitlines() if ln.strip()]


# ----------------------------------------------------------------------------- the embedded corpus


def test_embedded_corpus_size_and_form():
    paras = _embedded_paragraphs()
    words = [len(p.split()) for p in paras]
    assert len(paras) >= 120 and min(words) >= 90
    assert len(set(paras)) == len(paras), "duplicate paragraphs"
    C.EMBEDDED_CORPUS.read_bytes().decode("ascii")  # plain ASCII, no markup
    assert not any(p.lstrip().startswith(("#", "=", "-", "*")) for p in paras)


def test_embedded_corpus_gives_the_papers_draw(tokenizer):
    """100 texts of 128 tokens can be drawn as the paper draws them from WikiText-2."""
    tc = C.load_eval_corpus(tokenizer, corpus="embedded", n_texts=100, max_tokens=128)
    assert len(tc) == 100 and (tc.lengths == 128).all()
    assert tc.meta["corpus_source"] == "embedded" and tc.meta["corpus_variant"] == C.EMBEDDED_VERSION


def test_data_card_states_the_measured_size(tokenizer):
    """The data card's paragraph, word and token counts are those of the shipped file."""
    card = (C.EMBEDDED_CORPUS.parent / "EMBEDDED_CORPUS.md").read_text()
    paras = _embedded_paragraphs()
    n_tokens = [len(tokenizer(p)["input_ids"]) for p in paras]
    n_words = [len(p.split()) for p in paras]
    assert f"- {len(paras)} paragraphs" in card
    assert f"{sum(n_words):,} words; {min(n_words)} to {max(n_words)} words per paragraph" in card
    assert f"{sum(n_tokens):,} tokens" in card and f"{min(n_tokens)} to {max(n_tokens)} per paragraph" in card
    assert C.EMBEDDED_VERSION in card and "MIT" in card


# ----------------------------------------------------------------------------- resolution


def test_auto_falls_back_loudly_without_wikitext(no_hub):
    with pytest.warns(C.CorpusFallbackWarning, match="embedded corpus"):
        src = C.resolve_corpus("auto")
    assert src.name == "embedded" and not src.is_paper_corpus
    assert "MOEAUDIT_DATA_DIR" in src.fallback_reason and "hub" in src.fallback_reason
    assert src.key() == {"corpus_source": "embedded", "corpus_variant": C.EMBEDDED_VERSION}


def test_embedded_by_name_does_not_warn(no_hub):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        src = C.resolve_corpus("embedded")
    assert src.name == "embedded" and src.fallback_reason is None


@pytest.mark.parametrize("name,lines,variant", [("test.txt", TOKENIZED, C.WIKITEXT_TOKENIZED),
                                                ("test.txt", RAW, C.WIKITEXT_RAW),
                                                ("wiki.test.raw", RAW, C.WIKITEXT_RAW),
                                                ("wiki.test.tokens", TOKENIZED, C.WIKITEXT_TOKENIZED)])
def test_local_wikitext_and_its_release_are_named(tmp_path, no_hub, name, lines, variant):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    for requested in ("auto", "wikitext-2"):
        src = C.resolve_corpus(requested, data_dir=tmp_path)
        assert src.name == "wikitext-2" and src.variant == variant and src.is_paper_corpus
        assert list(src.lines) == lines and name in src.origin and variant in src.describe()


def test_wikitext_required_but_absent_is_one_clear_error(no_hub):
    with pytest.raises(FileNotFoundError, match=r"corpus='wikitext-2'.*MOEAUDIT_DATA_DIR"):
        C.resolve_corpus("wikitext-2")


def test_text_file_corpus(tmp_path, tokenizer):
    f = tmp_path / "texts.txt"
    f.write_text("\n".join(f"Text number {i} is a sentence that is long enough to be selected here." for i in range(5)))
    src = C.resolve_corpus(str(f))
    assert src.name == "file" and src.variant.startswith("sha256:") and str(f) in src.describe()
    tc = C.load_eval_corpus(tokenizer, corpus=src, n_texts=5, max_tokens=64)
    assert len(tc) == 5 and tc.meta["corpus_source"] == "file"
    with pytest.raises(ValueError, match=r"corpus=.*texts.txt.*n_texts=6"):
        C.load_eval_corpus(tokenizer, corpus=str(f), n_texts=6)
    f.write_text("Another text entirely, long enough to be selected by the rule of fifty characters.\n")
    assert C.resolve_corpus(str(f)).variant != src.variant  # the content identifies the corpus


@pytest.mark.parametrize("value,error,pattern", [
    ("no/such/file.txt", FileNotFoundError, r"corpus='no/such/file.txt': no such file"),
    ("", TypeError, r"corpus=''"),
    (3, TypeError, r"corpus=3"),
    (None, TypeError, r"corpus=None"),
])
def test_bad_corpus_values(value, error, pattern):
    with pytest.raises(error, match=pattern):
        C.resolve_corpus(value)


def test_empty_or_directory_or_binary_corpus_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"corpus=.*empty.txt.*is empty"):
        C.resolve_corpus(str(empty))
    with pytest.raises(ValueError, match="is not a file"):
        C.resolve_corpus(str(tmp_path))
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(ValueError, match="not UTF-8"):
        C.resolve_corpus(str(binary))
    with pytest.raises(ValueError, match="split='validation'"):
        C.resolve_corpus("embedded", split="validation")


def test_hub_probe_is_skipped_in_offline_mode(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert C._hub_offline_mode()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert not C._hub_offline_mode()


# ----------------------------------------------------------------------------- use by the audit and the book


def test_bad_corpus_fails_before_any_model_is_loaded(monkeypatch, tmp_path):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the corpus was checked")

    monkeypatch.setattr(audit, "load_model", no_load)
    with pytest.raises(FileNotFoundError, match="corpus="):
        audit.prepare("tiny-olmoe", corpus=str(tmp_path / "missing.txt"), results_dir=tmp_path)


def test_corpus_is_part_of_the_record_key(tmp_path, no_hub):
    """The clean pass of the same model on two corpora is stored under two keys, each naming its corpus."""
    f = tmp_path / "texts.txt"
    f.write_text("\n".join(f"Paragraph {i}: the harbour town built a stone bridge over the river in {1800 + i}."
                           for i in range(4)))
    keys = {}
    for corpus in ("embedded", str(f)):
        ctx = audit.prepare("tiny-olmoe", corpus=corpus, n_texts=2, results_dir=tmp_path / "results")
        keys[ctx.provenance["corpus_source"]] = audit.params_key(ctx.provenance)
        assert ctx.corpus_source.requested == corpus
    assert set(keys) == {"embedded", "file"} and len(set(keys.values())) == 2
    for key in keys.values():
        params = json.loads((tmp_path / "results" / "clean" / key / "params.json").read_text())
        assert params["corpus_source"] in ("embedded", "file") and params["corpus_variant"]


def test_admonition_names_the_corpus_and_says_when_numbers_are_illustrative(no_hub, tmp_path):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "test.txt").write_text("\n".join(TOKENIZED))
    paper = report.corpus_admonition(C.resolve_corpus("auto", data_dir=tmp_path))._repr_html_()
    assert "admonition note" in paper and "wikitext-2-v1" in paper and "illustrative" not in paper
    with pytest.warns(C.CorpusFallbackWarning):
        fallback = C.resolve_corpus("auto")
    page = report.corpus_admonition(fallback)._repr_html_()
    assert "admonition warning" in page and "illustrative" in page and "MOEAUDIT_DATA_DIR" in page
    example = report.corpus_admonition(fallback, scope="example")._repr_html_()
    assert "example predictions" in example
    with pytest.raises(ValueError, match="scope="):
        report.corpus_admonition(fallback, scope="chapter")


def test_every_chapter_that_reads_text_has_the_corpus_parameter_and_shows_it():
    for stem in book.chapters():
        src = (book.NOTEBOOKS / f"{stem}.py").read_text()
        if stem.startswith("08_"):
            assert "released.show_released_source(" in src
            continue
        if stem.startswith("13_"):  # the study's data first; its shipped-model section reads the embedded
            assert "M.show_source(" in src  # corpus, whose paragraph groups define the topic families
            assert all('corpus="embedded"' in call for call in re.findall(r"prepare\([^)]*\)", src, flags=re.S))
            continue
        assert book.notebook_parameters(stem)["corpus"] == "auto", stem
        assert "report.show_corpus(corpus" in src, stem
        for call in re.findall(r"prepare\([^)]*\)", src, flags=re.S):
            form = 'text_form=params["text_form"]' if stem == "A2_departures" else "text_form=text_form"  # A2: a chapter's
            assert "corpus=corpus_source" in call and form in call, f"{stem}: {call}"
        if stem != "A2_departures":
            assert book.notebook_parameters(stem)["text_form"] == "auto", stem


def test_chapter_with_bad_corpus_fails_in_a_second(monkeypatch, tmp_path):
    import papermill

    def never(*args, **kwargs):
        raise AssertionError("the kernel was started")

    monkeypatch.setattr(papermill, "execute_notebook", never)
    with pytest.raises(FileNotFoundError, match=r"corpus='.*missing.txt': no such file"):
        book.execute_chapter("04_audit", {"corpus": str(tmp_path / "missing.txt")}, book_dir=tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        book.execute_chapter("01_introduction", {"corpus": str(empty)}, book_dir=tmp_path)
    with pytest.raises(ValueError, match="text_form='raw'"):
        book.execute_chapter("04_audit", {"text_form": "raw"}, book_dir=tmp_path)
    with pytest.raises(TypeError, match="corpus=5"):
        book.execute_chapter("04_audit", {"corpus": 5}, book_dir=tmp_path)


def test_preflight_reports_what_will_be_used(no_hub):
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback is reported as a line, not a stray warning
        problems = book.preflight(log=lines.append)
    assert problems == []
    text = "\n".join(lines)
    assert "corpus='auto': the embedded corpus" in text and "illustrative" in text
    from moeaudit.zoo import SHIPPED_MODELS

    assert "released results:" in text and f"models: {', '.join(sorted(SHIPPED_MODELS))}" in text


def test_preflight_finds_a_missing_model(monkeypatch, tmp_path):
    import moeaudit.zoo as zoo

    monkeypatch.setattr(zoo, "zoo_path", lambda name: tmp_path)
    monkeypatch.setattr(book, "zoo_path", lambda name: tmp_path)  # the driver imports it by name
    problems = book.preflight(["04_audit"], log=lambda *_: None)
    assert len(problems) == 3 and all("config.json" in p for p in problems)


def test_sampler_on_the_embedded_corpus_is_seeded(tokenizer):
    tc = C.load_eval_corpus(tokenizer, corpus="embedded", n_texts=20, max_tokens=64)
    a, b = C.sample_positions(tc, n=50, seed=1), C.sample_positions(tc, n=50, seed=1)
    assert a.equals(b) and not a.equals(C.sample_positions(tc, n=50, seed=2))
    assert np.all(a.t.to_numpy() <= tc.lengths[a.seq_id.to_numpy()] - 2)


def test_text_forms(tokenizer):
    """The released form keeps a line as served (leading space, line break); it changes the first token."""
    lines = [" = Heading = ", " The harbour town built a stone bridge over the river in the year of the flood . "]
    released = C.select_texts(lines, n_texts=1, min_chars=20)
    stripped = C.select_texts(lines, n_texts=1, min_chars=20, text_form="stripped")
    assert released == [lines[1] + "\n"] and stripped == [lines[1].strip()]
    assert C.select_texts([lines[1] + "\n"], n_texts=1, min_chars=20) == [lines[1] + "\n"]  # hub lines keep theirs
    ids_r, ids_s = (tokenizer(t)["input_ids"] for t in (released[0], stripped[0]))
    assert ids_r[0] != ids_s[0] and len(ids_r) > len(ids_s)
    for bad in ("raw", "auto"):  # "auto" is resolved for a corpus first
        with pytest.raises(ValueError, match=f"text_form='{bad}'"):
            C.select_texts(lines, n_texts=1, text_form=bad)
    tc = C.load_eval_corpus(tokenizer, corpus="embedded", n_texts=3, max_tokens=64, text_form="stripped")
    assert tc.meta["text_form"] == "stripped"
    assert C.load_eval_corpus(tokenizer, corpus="embedded", n_texts=3, max_tokens=64).meta["text_form"] == "wikitext"


def test_wikitext_form_by_hand():
    unk = {"Odric", "Varrasc"}
    assert C.wikitext_form("King Odric's crown-mark (1,000 grains, 3.5%) didn't last; the miners' guild.", unk) == (
        "King <unk> 's crown @-@ mark ( 1 @,@ 000 grains , 3 @.@ 5 % ) didn 't last ; the miners ' guild .")
    # a listed word is replaced only as a whole word; numbers, years and ranges as WikiText writes them
    assert C.wikitext_form("Varrascan trade in 1412-1419: 2.5 tons.", unk) == \
        "Varrascan trade in 1412 @-@ 1419 : 2 @.@ 5 tons ."
    assert C.wikitext_form("  A plain sentence  ") == "A plain sentence"


def test_embedded_wikitext_form_selects_the_same_paragraphs():
    lines = list(C.resolve_corpus("embedded").lines)
    plain = C.select_texts(lines, n_texts=100, text_form="stripped")
    wiki = C.select_texts(lines, n_texts=100, text_form="wikitext")
    assert len(wiki) == 100 and all(w.startswith(" ") and w.endswith(" \n") for w in wiki)
    unk = C.embedded_unk_words()
    assert len(unk) > 100 and all(w[0].isupper() for w in unk)
    for p, w in zip(plain, wiki):  # the same paragraph: its words that are not <unk> appear in the same order
        kept = [x for x in re.findall(r"[A-Za-z]+", w) if x != "unk"]
        assert kept == [x for x in re.findall(r"[A-Za-z]+", p) if x not in unk]
    assert sum(w.count("<unk>") for w in wiki) > 0
    assert not any(re.search(r"\w[,.;:()]", w) for w in wiki)  # punctuation always split off


def test_text_form_must_exist_for_the_corpus(tmp_path, no_hub):
    src = C.resolve_corpus("embedded")
    assert C.resolve_text_form(src) == "wikitext" and C.resolve_text_form(src, "released") == "released"
    f = tmp_path / "texts.txt"
    f.write_text("A first text that is long enough to be selected by the rule.\n")
    file_src = C.resolve_corpus(str(f))
    assert C.resolve_text_form(file_src) == "released"
    with pytest.raises(ValueError, match=r"text_form='wikitext' does not exist for the file .* \(a file is read as "
                                         r"written\); the forms allowed for this corpus are 'auto', 'released', 'stripped'"):
        C.resolve_text_form(file_src, "wikitext")
    with pytest.raises(ValueError, match=r"WikiText-2 is read as released.*\); the forms allowed .* "
                                         r"'auto', 'released', 'stripped'"):
        C.resolve_text_form("wikitext-2", "wikitext")


@pytest.mark.skipif(not (os.environ.get("MOEAUDIT_DATA_DIR") and
                         (Path(os.environ["MOEAUDIT_DATA_DIR"]) / "wikitext-2" / "valid.txt").is_file()),
                    reason="$MOEAUDIT_DATA_DIR does not hold wikitext-2/valid.txt")
def test_shipped_unk_list_is_rederived_from_the_training_text():
    valid = C.load_wikitext2("validation")
    assert C.derive_unk_words(C.resolve_corpus("embedded").lines, valid) == sorted(C.embedded_unk_words())
    path = Path(os.environ["MOEAUDIT_DATA_DIR"]) / "wikitext-2" / "valid.txt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() in C.EMBEDDED_UNK_WORDS.read_text()


def test_text_form_is_checked_before_loading_and_part_of_the_key(monkeypatch, tmp_path, no_hub):
    with pytest.raises(ValueError, match="text_form="):
        audit.prepare("tiny-olmoe", corpus="embedded", text_form="strip", results_dir=tmp_path)
    keys = {form: audit.params_key(audit.prepare("tiny-olmoe", corpus="embedded", n_texts=2, text_form=form,
                                                 results_dir=tmp_path).provenance) for form in C.TEXT_FORMS}
    assert len(set(keys.values())) == 3 and keys["auto"] == keys["wikitext"]



def test_a_text_file_is_split_at_line_feeds_only(tmp_path):
    """Form feed, U+2028, U+0085 and other separators that str.splitlines honours stay inside a text."""
    f = tmp_path / "texts.txt"
    texts = ["A first text long enough to be selected\x0cwith a form feed inside it, as files have.",
             "A second text long enough to be selected\u2028with a line separator inside it, too.",
             "A third text long enough to be selected\x85with a next-line character inside it."]
    f.write_bytes(("\ufeff" + "\r\n".join(texts) + "\n").encode("utf-8"))  # with a byte-order mark
    src = C.resolve_corpus(str(f))
    assert list(src.lines) == texts
    f.write_bytes("A text long enough to be selected, with a lone\rcarriage return inside it.\n".encode())
    assert len(C.resolve_corpus(str(f)).lines) == 1
    assert C.select_texts(list(src.lines), n_texts=3, text_form="stripped") == texts
    assert C.split_lines("a\nb") == ["a", "b"] and C.split_lines("a\n\nb\n") == ["a", "", "b"]


def test_texts_longer_than_the_model_context_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"max_tokens=200 exceeds the context of tiny-olmoe \(max_position_embeddings=128\)"):
        audit.prepare("tiny-olmoe", corpus="embedded", max_tokens=200, results_dir=tmp_path)
    C.check_context(128, 128)
    C.check_context(10_000, None)  # unknown context: nothing to check
    ctx = audit.prepare("tiny-olmoe", corpus="embedded", n_texts=2, max_tokens=128, results_dir=tmp_path,
                        progress=False)
    assert ctx.corpus.lengths.max() <= 128
    # a corpus built by other means is checked by every pass over it
    from moeaudit import engine, pruning

    long = C.TokenizedCorpus.from_token_ids([np.arange(200) % 100])
    for fn in (lambda: engine.clean_pass(ctx.model, long, progress=False),
               lambda: pruning.perplexity(ctx.model, long, progress=False)):
        with pytest.raises(ValueError, match="a text of 200 tokens exceeds the context of tiny-olmoe"):
            fn()


def test_positions_need_an_integer_seed(tokenizer):
    tc = C.load_eval_corpus(tokenizer, corpus="embedded", n_texts=3, max_tokens=64)
    for bad in (None, -1, 1.5, "0"):
        with pytest.raises(ValueError, match="seed must be an integer >= 0"):
            C.sample_positions(tc, n=5, seed=bad)
    with pytest.raises(TypeError, match="n_positions must be an integer"):
        C.sample_positions(tc, n=2.5, seed=0)
