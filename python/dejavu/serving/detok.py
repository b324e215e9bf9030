"""A stream's text deltas (serving): incremental detokenization (engine/detok.py) plus the hold-back
of text that may still become a stop string."""
from __future__ import annotations

from ..engine.detok import IncrementalDecoder


class TextStream:
    """A stream's text deltas: the decoded text so far, minus what may still change (an
    incomplete UTF-8 character, or a possible beginning of a stop string)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.dec = IncrementalDecoder(tokenizer)
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.sent = ""

    def delta(self, new_ids: list[int], final_text: str | None = None) -> str:
        """The text to send after `new_ids`; `final_text`: the request finished with this text."""
        if final_text is not None:
            text = final_text
        else:
            self.dec.push(new_ids)
            text = self.dec.text
            text = text[: max(len(self.sent), len(text) - self.holdback)]
        if not text.startswith(self.sent):
            return ""  # never retract what a client already has
        d, self.sent = text[len(self.sent):], text
        return d
