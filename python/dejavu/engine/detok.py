"""Incremental detokenization: the text of a growing list of token ids, in linear time.

Each new token is decoded together with the few tokens before it (for context: a SentencePiece
word-start space, or the rest of a UTF-8 character a byte-level BPE split over several tokens), and
text is released only once it no longer ends in an incomplete character ("\\ufffd"). So a stream's
deltas never carry a broken character and, concatenated, equal the decode of all the ids.
"""
from __future__ import annotations


class IncrementalDecoder:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # ids[_prefix:_read] were decoded already: the context of the next decode
        self._read = 0

    def push(self, new_ids: list[int]) -> str:
        """Adds tokens; returns the text they complete (possibly "")."""
        self.ids += new_ids
        before = self.tok.decode(self.ids[self._prefix:self._read])
        now = self.tok.decode(self.ids[self._prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd") or not now.startswith(before):
            return ""
        delta = now[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta
