"""Tokenize many examples with one call of the tokenizer: render first, encode every text at once, assemble.

Templates tokenize each rendered text on its own (`tokenizer.encode(text, add_special_tokens=False)`), as
LLaMA-Factory does, which costs one Python round trip into the tokenizer per text. `prefetch` runs the
encoder over a chunk of conversations with a stand-in tokenizer that only notes the texts asked for
(rendering never depends on ids), encodes them all with one batched call (the Rust tokenizer spreads a
batch over its threads), and returns a tokenizer whose `encode` answers from those ids. Encoding the chunk
again with it gives the same ids as encoding each text alone, by construction: the same texts go to
the same tokenizer, only batched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


class _Recorder:
    """Stands in for the tokenizer while texts are collected: `encode` notes the text and returns no ids;
    everything else is the tokenizer's."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.texts: dict[str, None] = {}

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs) -> list[int]:
        if add_special_tokens or kwargs:
            return self._tokenizer.encode(text, add_special_tokens=add_special_tokens, **kwargs)
        self.texts[text] = None
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


class Prefetched:
    """The tokenizer, with `encode(text, add_special_tokens=False)` answered from pre-computed ids."""

    def __init__(self, tokenizer, ids: dict[str, list[int]]):
        self._tokenizer, self._ids = tokenizer, ids

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs) -> list[int]:
        if not add_special_tokens and not kwargs:
            ids = self._ids.get(text)
            if ids is not None:
                return list(ids)
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """`[tokenizer.encode(t, add_special_tokens=False) for t in texts]` in one batched call."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def prefetch(tokenizer, items: Iterable[Any], encode: Callable[[Any, Any], Any]) -> Prefetched:
    """A tokenizer that answers every text `encode(item, tokenizer)` asks for, for these items, from one
    batched encoding. An item whose encoding fails here is left to fail again, with the real error, when
    it is encoded with the result."""
    recorder = _Recorder(tokenizer)
    for item in items:
        try:
            encode(item, recorder)
        except Exception:  # noqa: BLE001 - re-raised when the item is encoded for real
            pass
    texts = list(recorder.texts)
    return Prefetched(tokenizer, dict(zip(texts, encode_texts(tokenizer, texts))))
