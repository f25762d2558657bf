"""Detokenizing a stream of tokens into text while watching for stop strings.

Two invariants hold for every generation, streamed or not:

* the text handed out, concatenated, equals ``tokenizer.decode(completion token ids)``, cut just
  before the first stop string when one was hit. ``IncrementalDecoder`` keeps the first half
  (mlx-lm's streaming detokenizers do not: the byte-level BPE one drops the first token's
  leading space);
* every piece of text, including what the decoder only releases at the end, goes through the
  same stop-string check (``StopText._release``).

mlx-lm only stops on token ids (EOS); stop strings are matched here on the decoded text. Text
that could still grow into a stop string is held back until the next token decides, so a caller
never receives text that a stop string later cuts off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_INCOMPLETE = "\ufffd"  # what decode makes of a UTF-8 character whose bytes have not all come yet


class IncrementalDecoder:
    """Token ids to text one token at a time: ``text`` after ``finalize`` is ``decode(all ids)``.

    ``decode``: token ids -> text, the tokenizer's own (``tokenizer.decode``). Each token decodes
    a short window (the tokens since the previous release, plus the ones before that as context)
    and appends what the window gained: cheap, and right for decoders that treat a sequence's
    first token specially (SentencePiece drops its leading space) because the window's first
    token is decoded the same way in both halves of the difference. Text ending in an
    incomplete character waits for the next token; ``finalize`` releases it as decode would.
    Same interface as mlx-lm's streaming detokenizers: ``add_token``, ``finalize``, ``text``,
    ``tokens``. (A decoder that rewrites earlier text when a token is added, as SentencePiece
    byte fallback does for bytes that never form valid UTF-8, cannot be streamed exactly: the
    text released stays, and the rest follows it.)
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self.tokens: list[int] = []
        self.text = ""
        self._prefix = 0  # first token of the window
        self._read = 0  # tokens whose text is in self.text
        self._prefix_text = ""  # decode(tokens[_prefix:_read])

    def add_token(self, token: int) -> None:
        self.tokens.append(int(token))
        self._release(final=False)

    def finalize(self) -> None:
        """Releases the text still waiting for more tokens (an incomplete character decodes to
        U+FFFD, as in ``decode``)."""
        self._release(final=True)

    def _release(self, final: bool) -> None:
        if self._read == len(self.tokens):
            return
        window = self._decode(self.tokens[self._prefix :])
        if not final and (window.endswith(_INCOMPLETE) or len(window) <= len(self._prefix_text)):
            return
        if window.startswith(self._prefix_text):
            self.text += window[len(self._prefix_text) :]
        else:  # a decoder whose windows do not compose: fall back to decoding everything
            full = self._decode(self.tokens)
            if full.startswith(self.text):
                self.text = full
            else:  # it rewrote text already released, which cannot be taken back: append the rest
                same = next(
                    (i for i, (a, b) in enumerate(zip(window, self._prefix_text)) if a != b),
                    min(len(window), len(self._prefix_text)),
                )
                self.text += window[same:]
        self._prefix, self._read = self._read, len(self.tokens)
        self._prefix_text = self._decode(self.tokens[self._prefix : self._read])


def remember_single_tokens(decode: Callable[[Sequence[int]], str]) -> Callable[[Sequence[int]], str]:
    """``decode`` that keeps the text of every single token it decoded. ``IncrementalDecoder``
    decodes each new token once in its window and once alone (the next window's prefix); shared by
    a model's requests, the second decode becomes a dict lookup. At most one entry per token id of
    the vocabulary; the text is ``decode``'s own, so every result is unchanged."""
    texts: dict[int, str] = {}

    def cached(ids: Sequence[int]) -> str:
        if len(ids) != 1:
            return decode(ids)
        text = texts.get(ids[0])
        if text is None:
            text = texts[ids[0]] = decode(ids)
        return text

    return cached


def held_back(text: str, stops) -> int:
    """Length of the longest tail of ``text`` that could still grow into one of ``stops``."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class StopText:
    """One request's output text: feed tokens with ``push``, collect what is safe to send, and
    at the end call ``finish`` once.

    ``detokenizer`` (``add_token``, ``finalize``, ``text``) is this request's own, normally an
    ``IncrementalDecoder``.
    """

    def __init__(self, detokenizer, stops: tuple[str, ...]):
        self._detok = detokenizer
        self.stops = tuple(stops)
        self._sent = 0  # characters of text already handed out
        self._finalized = False
        self.stopped = False  # a stop string was hit: no more text is sent

    def push(self, token: int, last: bool) -> tuple[str, bool]:
        """Adds ``token`` (``last``: no token follows). Returns (text to send now, whether a stop
        string was hit); after a hit the text ends just before the stop string and no more
        text is sent."""
        self._detok.add_token(token)
        if last:
            self._finalize()
        return self._release()

    def finish(self) -> tuple[str, bool]:
        """At the end of a generation (EOS, or after the last ``push``): returns (the text not
        sent yet, whether a stop string was hit in it). What the detokenizer only releases now
        is checked for stop strings like everything before it."""
        self._finalize()
        return self._release()

    def _finalize(self) -> None:
        if not self._finalized:
            self._detok.finalize()
            self._finalized = True

    def _release(self) -> tuple[str, bool]:
        """The one place text leaves: cut at the first stop string, else hold back what could
        still become one (nothing once the detokenizer is finalized)."""
        if self.stopped:
            return "", True
        text = self._detok.text
        if self.stops:
            # Only the new text (plus a stop string's length of the old) can hold a new match.
            found = [p for p in (text.find(s, max(0, self._sent - len(s))) for s in self.stops) if p >= 0]
            if found:
                hit = min(found)
                piece = text[self._sent : hit]
                self._sent = max(self._sent, hit)
                self.stopped = True
                return piece, True
        safe = len(text) if self._finalized else len(text) - held_back(text, self.stops)
        piece = text[self._sent : safe]
        self._sent = max(self._sent, safe)
        return piece, False
