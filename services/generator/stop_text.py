"""Detokenizing a stream of tokens into text while watching for stop strings.

mlx-lm only stops on token ids (EOS); stop strings are matched here on the decoded text. Text
that could still grow into a stop string is held back until the next token decides, so a caller
never receives text that a stop string later cuts off.
"""

from __future__ import annotations


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
    """One request's output text: feed tokens with ``push``, collect what is safe to send.

    ``detokenizer`` is an mlx-lm streaming detokenizer (``add_token``, ``finalize``, ``text``)
    for this request alone.
    """

    def __init__(self, detokenizer, stops: tuple[str, ...]):
        self._detok = detokenizer
        self.stops = tuple(stops)
        self._sent = 0            # characters of text already handed out
        self._finalized = False

    def push(self, token: int, last: bool) -> tuple[str, bool]:
        """Adds ``token`` (``last``: no token follows). Returns (text to send now, whether a stop
        string was hit); after a hit the text ends just before the stop string and no more
        text is sent."""
        self._detok.add_token(token)
        if last:
            self._detok.finalize()
            self._finalized = True
        text = self._detok.text
        if self.stops:
            # Only the new text (plus a stop string's length of the old) can hold a new match.
            found = [p for p in (text.find(s, max(0, self._sent - len(s))) for s in self.stops) if p >= 0]
            if found:
                hit = min(found)
                piece = text[self._sent:hit]
                self._sent = hit
                return piece, True
        safe = len(text) if last else len(text) - held_back(text, self.stops)
        piece = text[self._sent:safe]
        self._sent = max(self._sent, safe)
        return piece, False

    def rest(self) -> str:
        """At the end of a generation not stopped by a stop string: the text not sent yet."""
        if not self._finalized:
            self._detok.finalize()
            self._finalized = True
        return self._detok.text[self._sent:]
