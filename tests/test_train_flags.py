"""training/train.py refuses nonsense flag values up front with a message naming the flag, before
building a tokenizer or a model (not with a traceback, or a run that trains on nonsense)."""

from __future__ import annotations

import pytest

from training import batches, train


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--own-docs", "20", "--questions", "8"], "--own-docs must be <= --questions"),
        (["--own-docs", "0"], "--own-docs must be >= 1"),
        (["--head-dim", "3"], "must be even"),
        (["--hidden", "60", "--heads", "4"], "must be even"),  # 15 per head
        (["--hidden", "4", "--heads", "8"], "must be even and > 0"),  # 0 per head
        (["--heads", "6", "--kv-heads", "4"], "--heads must be a multiple of --kv-heads"),
        (["--heads", "0"], "--heads must be a multiple of --kv-heads"),
        (["--rope-theta", "nan"], "--rope-theta > 0"),
        (["--rope-theta", "-1"], "--rope-theta > 0"),
        (["--rope-theta", "inf"], "--rope-theta > 0"),  # RoPE would turn every query and key into NaN
        (["--multi", "nan"], "--multi must be in [0, 1]"),
        (["--multi", "1.5"], "--multi must be in [0, 1]"),
        (["--max-people", "1"], "--max-people >= 2"),
        (["--max-people", "500"], "--max-people must be <= 16"),
        (["--mem-docs", "2"], "--mem-docs must be >= 3"),
        (["--questions", "0"], "--questions >= 1"),
        (["--w-subj", "-1"], "--w-subj and --w-ret-doc must be >= 0"),
        (["--w-subj", "inf"], "--w-subj and --w-ret-doc must be >= 0 (finite)"),
        (["--w-ret-doc", "inf"], "--w-subj and --w-ret-doc must be >= 0 (finite)"),
        (["--w-ret-doc", "nan"], "--w-subj and --w-ret-doc must be >= 0 (finite)"),
        (["--w-lm", "-0.5"], "--w-lm, --w-ctx, --w-ret"),
        (["--w-ctx", "inf"], "--w-lm, --w-ctx, --w-ret"),
        (["--tau", "inf"], "--tau must be > 0 (finite)"),
        (["--tau", "0"], "--tau must be > 0"),
        (["--w-ret", "0", "--w-ret-doc", "1"], "--w-ret-doc needs --w-ret > 0"),
    ],
)
def test_nonsense_flags_are_refused_naming_the_flag(tmp_path, capsys, flags, words):
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(tmp_path / "out"), *flags])
    assert e.value.code == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any tokenizer was built


def test_own_docs_beyond_questions_is_fine_without_the_own_memory_phase(tmp_path):
    """--own-fraction 0 skips the per-question memories: --own-docs is not used then."""
    out = tmp_path / "out"
    assert train.main(["--out", str(out), "--own-fraction", "0", "--own-docs", "500", "--tokenizer-only"]) == 0
    assert (out / "tokenizer.json").exists()


def test_naming_after_states_each_value_before_the_full_name():
    """--naming after: every sentence gives the value and ends with the person's full name, and
    answer_span still finds the sentence that states each attribute."""
    import random

    from training import facts

    old = facts.NAMING
    facts.NAMING = "after"
    try:
        rng = random.Random(3)
        for e in facts.make_entities(rng, 20):
            doc, attrs = facts.document(rng, e)
            for attr in attrs:
                lo, hi = facts.answer_span(doc, e, attr)
                sentence = doc[lo:hi]
                assert sentence.endswith(f"{e.name}.") and e.attrs[attr] in sentence
                assert sentence.index(e.attrs[attr]) < sentence.index(e.name)
    finally:
        facts.NAMING = old


def test_subject_and_document_targets_follow_the_paragraphs():
    """The subject loss labels every document token with the full name of the person its paragraph
    is about (documents of several people: newline-separated paragraphs): the runs of equal labels
    are the paragraphs, each naming its labelled person. The within-document retrieval mask covers
    exactly the rows of each question's own document."""
    from pathlib import Path

    import numpy as np

    tok = train.load_tokenizer(Path("models/extmind-facts-6m"))
    pad, bos = tok.token_to_id(train.PAD), tok.token_to_id(train.BOS)
    b = batches.make_batch(tok, 7, n_mem=6, n_q=8, n_ctx=2, pad=pad, bos=bos, multi=1.0, max_people=3)
    docs, L = b["docs"], b["docs"].shape[1]
    assert len(b["subj_pos"]) == int(b["valid"].sum())  # every stored row is labelled
    for d in range(len(docs)):
        at = b["subj_pos"] // L == d
        pos, names = b["subj_pos"][at] % L, b["subj_doc"][at]
        runs, start = [], 0
        for i in range(1, len(pos) + 1):
            if i == len(pos) or not np.array_equal(names[i], names[start]):
                runs.append((tok.decode([int(t) for t in docs[d][pos[start:i]]]), names[start]))
                start = i
        text = tok.decode([int(t) for t in docs[d] if t not in (pad, bos)])
        assert len(runs) == text.count("\n") + 1 >= 2  # one run per paragraph
        for segment, name in runs:
            who = tok.decode([int(t) for t in name if t >= 0]).strip()
            assert who in segment, (who, segment)
    rows = b["rows"]
    for doc_mask in b["ret_doc"]:
        own = set((rows[doc_mask > 0] // L).tolist())
        assert len(own) == 1  # the rows of one document ...
        assert int(doc_mask.sum()) == int(b["valid"][own.pop()].sum())  # ... all of them
