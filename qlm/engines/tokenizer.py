"""The simulated models' tokenizer: one token per UTF-8 byte, so no vocabulary file is needed
and token counts are predictable in tests."""

from __future__ import annotations

from collections.abc import Iterable


class ByteTokenizer:
    vocab_size = 256
    # NUL never appears in normal text, so it is free to mark the end of a sequence.
    eos_token_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < self.vocab_size)]
        if bad:
            raise ValueError(
                f"byte tokenizer ids must be integers in 0..{self.vocab_size - 1}, got {bad[:5]!r}"
            )
        # A token sequence cut mid-character is still shown rather than rejected.
        return bytes(ids).decode("utf-8", errors="replace")
