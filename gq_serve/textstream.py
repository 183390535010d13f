"""Token ids -> text deltas, with stop strings that never leak into the output.

Decoding token by token is wrong for byte-level BPE (a character can span tokens) and for
tokenizers whose decoders join words with spaces, so deltas come from decoding a short window
and diffing, the way streaming servers do it.
"""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalDetokenizer:
    """Turns one token id at a time into the text it adds."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window (gives the decoder its context)
        self._read_offset = 0  # ids before this are already emitted as text

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        # A trailing U+FFFD means a multi-byte character is still incomplete: wait for more ids.
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text) :]
        return ""


class StopStringFilter:
    """Holds back text that might be the start of a stop string; cuts at the first full match."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = [s for s in stop if s]
        self._text = ""  # everything decoded so far
        self._emitted = 0  # characters of _text already released
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add decoded text; return what is safe to emit now (sets `stopped` on a match)."""
        if self.stopped:
            return ""
        self._text += delta
        if not self._stop:
            out = self._text[self._emitted :]
            self._emitted = len(self._text)
            return out
        # A match can start up to len(stop)-1 characters before the new text.
        longest = max(len(s) for s in self._stop)
        search_from = max(0, self._emitted - longest + 1)
        hits = [i for i in (self._text.find(s, search_from) for s in self._stop) if i >= 0]
        if hits:
            cut = min(hits)
            out = self._text[self._emitted : max(cut, self._emitted)]
            self._emitted = len(self._text)
            self.stopped = True
            return out
        safe = len(self._text) - self._held_suffix()
        out = self._text[self._emitted : max(safe, self._emitted)]
        self._emitted = max(safe, self._emitted)
        return out

    def flush(self) -> str:
        """Release held-back text at the end of generation (no stop string completed)."""
        if self.stopped:
            return ""
        out = self._text[self._emitted :]
        self._emitted = len(self._text)
        return out

    def _held_suffix(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self._text)), best, -1):
                if self._text.endswith(s[:k]):
                    best = k
                    break
        return best
