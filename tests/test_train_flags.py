"""training/train.py refuses nonsense flag values up front with a message naming the flag, before
building a tokenizer or a model (not with a traceback, or a run that trains on nonsense)."""

from __future__ import annotations

import pytest

from training import train


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
