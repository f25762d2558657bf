"""Token chains a ``build_chain_llama`` model emits exactly, and the text invariant they check.

Each chain starts at a prompt token and lists the tokens (by their vocabulary strings) the model
then emits greedily, ending in EOS. The chains share no token, so one model holds them all.
"""

from __future__ import annotations

from pathlib import Path

from extmind.tiny_models import build_chain_llama
from extmind.tiny_tokenizers import build_tokenizer

EOS = "<|eot_id|>"

# name -> (prompt token, emitted tokens up to and including EOS), in the Llama tokenizer's vocabulary.
CHAINS = {
    # The first token starts with a space: mlx-lm's BPE detokenizer dropped it.
    "leading_space": ("Ġand", ["Ġthe", "Ġlazy", EOS]),
    # An emoji (F0 9F 98 80) over four byte tokens, then a word.
    "emoji_bytes": ("Ġover", ["ð", "Ł", "ĺ", "Ģ", "Ġsea", EOS]),
    # Words whose stop strings span two tokens.
    "split_stop": ("Ġinto", ["Ġcapital", "Ġis", "Ġone", EOS]),
    # A lone space before EOS: a detokenizer may hold it back until the end.
    "trailing_space": ("Ġfrom", ["Ġmoon", "Ġ", EOS]),
    # The first byte of a three-byte character, then EOS: decodes to U+FFFD only once the sequence ends.
    "incomplete_char": ("Ġland", ["Ġrain", "â", EOS]),
}

# name -> stop-string sets to run it with (besides none): ones that hit and ones that do not.
STOPS = {
    "leading_space": [(" the",), ("e l",), ("lazy",), ("zzz",)],
    "emoji_bytes": [("\U0001f600",), ("\U0001f600 s",), (" s", "sea"), ("x",)],
    "split_stop": [("al i",), ("is o", "capital"), ("s one",), ("one!",)],
    "trailing_space": [("moon ",), ("n ",), (" ",), ("moon  ",)],
    "incomplete_char": [("n\ufffd",), ("\ufffd",), ("rain",), ("rains",)],
}


def build(path) -> tuple[Path, dict[str, int]]:
    """Builds the chain model in ``path``; returns (path, vocabulary: token string -> id)."""
    from tokenizers import Tokenizer

    path = Path(path)
    build_tokenizer(path, "llama")
    vocab = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab()
    chain = {}
    for start, out in CHAINS.values():
        seq = [start, *out]
        for a, b in zip(seq, seq[1:]):
            assert vocab[a] not in chain, f"token {a!r} is in two chains"
            chain[vocab[a]] = vocab[b]
    return build_chain_llama(path, chain), vocab


def cases(vocab: dict[str, int]):
    """(name, prompt ids, stops, max_tokens) for every chain, stop set and length cut."""
    for name, (start, out) in CHAINS.items():
        for stops in [(), *STOPS[name]]:
            yield name, [vocab[start]], stops, 0
        for n in range(1, len(out)):  # cut by max_tokens before EOS
            yield name, [vocab[start]], (), n
            yield name, [vocab[start]], STOPS[name][0], n


def expect(tokenizer, vocab: dict[str, int], name: str, stops, max_tokens: int):
    """-> (completion ids, text, finish reason, completion_tokens) the engine must return.

    The invariant: text == decode(completion ids), cut before the first stop string found in
    it; the ids end with the token whose text completed a stop string. A character still
    incomplete waits for the next token, or for the end (EOS, which counts as a completion
    token but is not returned, or the last token max_tokens allows)."""
    out = [vocab[t] for t in CHAINS[name][1]]
    ids, reason = out[:-1], "stop"
    if max_tokens and max_tokens < len(out):
        ids, reason = out[:max_tokens], "length"

    def cut(text):
        hits = [text.find(s) for s in stops if s in text]
        return text[: min(hits)] if hits else None

    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n])
        if n < len(ids) or reason == "stop":
            text = text.rstrip("\ufffd")
        if cut(text) is not None:
            return ids[:n], cut(text), "stop_sequence", n
    text = tokenizer.decode(ids)
    n = len(ids) + (reason == "stop")
    return (ids, cut(text), "stop_sequence", n) if cut(text) is not None else (ids, text, reason, n)
