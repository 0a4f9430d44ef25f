"""Text models' preprocessing: tokenize with `tokenizers`, count tokens, pad a batch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

__all__ = ["TextEncoder", "TextTooLong"]


class TextTooLong(ValueError):
    """A text over the model's token limit, with truncation off."""

    def __init__(self, index: int, tokens: int, limit: int) -> None:
        super().__init__(
            f"input[{index}] has {tokens} tokens; the model accepts at most {limit}"
            " (shorten the text)"
        )
        self.index, self.tokens, self.limit = index, tokens, limit


class TextEncoder:
    """Token ids per text (no padding: a batch is padded to its own longest member)."""

    def __init__(
        self, path: Path, *, max_tokens: int, truncate: bool, graph_inputs: Sequence[str]
    ) -> None:
        self._tokenizer = Tokenizer.from_file(str(path))
        self._tokenizer.no_padding()
        self.max_tokens = max_tokens
        self.truncate = truncate
        if truncate:
            self._tokenizer.enable_truncation(max_length=max_tokens)
        else:
            self._tokenizer.no_truncation()
        padding = self._tokenizer.token_to_id("[PAD]")
        self.pad_id = 0 if padding is None else padding
        self._with_types = "token_type_ids" in graph_inputs

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = [e.ids for e in encodings]
        if not self.truncate:
            for index, one in enumerate(ids):
                if len(one) > self.max_tokens:
                    raise TextTooLong(index, len(one), self.max_tokens)
        return ids

    def collate(self, ids: Sequence[Sequence[int]]) -> dict[str, np.ndarray[Any, Any]]:
        """The graph's inputs for a batch, padded to its longest text."""
        width = max(len(one) for one in ids)
        input_ids = np.full((len(ids), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, one in enumerate(ids):
            input_ids[row, : len(one)] = one
            mask[row, : len(one)] = 1
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if self._with_types:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        return feeds
