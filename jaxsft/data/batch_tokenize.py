"""Tokenize many examples with one call of the tokenizer: render first, encode every text at once, assemble.

Templates tokenize each rendered text on its own (`tokenizer.encode(text, add_special_tokens=False)`), as
LLaMA-Factory does, which costs one Python round trip into the tokenizer per text. `prefetch` runs the
encoder over a chunk of conversations with a stand-in tokenizer that only notes the texts asked for
(rendering never depends on ids), encodes them all with one batched call (the Rust tokenizer spreads a
batch over its threads), and returns a tokenizer whose `encode` answers from those ids. Encoding the chunk
again with it gives the same ids as encoding each text alone, by construction: the same texts go to
the same tokenizer, only batched.

`TextTokenizer` is what named templates need of a Hugging Face fast tokenizer (encode without special
tokens, BOS / EOS ids, token -> id), held as the bare Rust `tokenizers.Tokenizer`: it skips transformers'
per-call Python work, pickles small and needs no transformers import in a worker process. `TextTokenizer.of`
gives one only where transformers' own `encode` is that Rust call (checked on probe texts), else None.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


class TextTokenizer:
    """The Rust tokenizer behind a transformers fast tokenizer, with the ids templates read; picklable."""

    def __init__(self, backend, bos_token_id: int | None, eos_token_id: int | None, pad_token_id: int | None):
        self.backend = backend
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        self.add_bos_token = False

    @classmethod
    def of(cls, tokenizer) -> "TextTokenizer | None":
        """The tokenizer's Rust core, when transformers' `encode(text, add_special_tokens=False)` is exactly
        its `encode(text, add_special_tokens=False)` (no Python-side override, same special-token
        splitting, no truncation or padding), checked on probe texts; else None."""
        backend = getattr(tokenizer, "_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch_fast"):
            return None
        kind = type(tokenizer)
        if (getattr(kind.encode, "__module__", "") != "transformers.tokenization_utils_base"
                or getattr(kind._encode_plus, "__module__", "") != "transformers.tokenization_utils_tokenizers"):
            return None
        backend = type(backend).from_str(backend.to_str())  # a copy: the settings below are ours alone
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
        fast = cls(backend, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        fast.add_bos_token = bool(getattr(tokenizer, "add_bos_token", False))  # plain-text rows read it
        specials = "".join(map(str, getattr(tokenizer, "all_special_tokens", [])))
        probes = ["Hello, world!", "  two  spaces\n\n\tand tabs ", "héllo wörld 你好 🙂", "\n", specials,
                  f"text{specials} around{specials}the special tokens", "1234567 3.14 x=y+z;"]
        if any(tokenizer.encode(p, add_special_tokens=False) != fast.encode(p) for p in probes):
            return None
        return fast

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if add_special_tokens:
            raise ValueError("TextTokenizer encodes without special tokens only")
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.backend.token_to_id(token)


class _Recorder:
    """Stands in for the tokenizer while texts are collected: `encode` notes the text and returns no ids;
    everything else is the tokenizer's."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.bos_token_id, self.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
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
        self.bos_token_id, self.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs) -> list[int]:
        if not add_special_tokens and not kwargs:
            ids = self._ids.get(text)
            if ids is not None:
                return ids  # callers only read it (templates concatenate into new lists)
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """`[tokenizer.encode(t, add_special_tokens=False) for t in texts]` in one batched call."""
    if not texts:
        return []
    if isinstance(tokenizer, TextTokenizer):
        return tokenizer.encode_batch(texts)
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
