"""Build the tiny embedded example model (examples/tiny-llama): a byte-level BPE tokenizer trained on
the embedded identity data and a 2-layer Llama with random weights, saved as Hugging Face files.

    python tools/make_tiny_model.py [--out examples/tiny-llama] [--layers 2] [--hidden 64]

Deterministic (same data and seed, same files). Uses only jaxsft's own dependencies (no torch).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from jaxsft.model.config import ModelConfig
from jaxsft.model.hf import params_to_hf_state_dict
from jaxsft.model.transformer import init_params

REPO = Path(__file__).resolve().parents[1]
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
           "<|eom_id|>"]


def train_tokenizer(texts, vocab_size: int, special_tokens: list[str] = SPECIAL) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with the llama3 special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", model_max_length=1 << 20)


def string_fields(rows: list[dict]) -> list[str]:
    return [v for row in rows for v in row.values() if isinstance(v, str)]


def save_random_llama(out: Path, tokenizer: PreTrainedTokenizerFast, *, layers: int, hidden: int,
                      intermediate: int, heads: int, kv_heads: int, max_positions: int, seed: int,
                      vocab_size: int | None = None, tie_word_embeddings: bool = False) -> int:
    """config.json and model.safetensors of a Llama with random N(0, 0.02) weights; returns the params.
    `vocab_size`: the embedding rows (default: the tokenizer's size; more rows are never looked up)."""
    LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                head_dim=hidden // heads, max_position_embeddings=max_positions,
                tie_word_embeddings=tie_word_embeddings,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                rms_norm_eps=1e-5).save_pretrained(str(out))
    model_cfg = ModelConfig.from_hf(json.loads((out / "config.json").read_text()))
    params = init_params(model_cfg, jax.random.key(seed), std=0.02)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32)
               for k, v in params_to_hf_state_dict(params, model_cfg).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return sum(v.size for v in tensors.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "examples" / "tiny-llama"))
    parser.add_argument("--data", default=str(REPO / "examples" / "data" / "identity.json"))
    parser.add_argument("--vocab_size", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(string_fields(json.loads(Path(args.data).read_text())), args.vocab_size)
    tokenizer.save_pretrained(str(out))
    n = save_random_llama(out, tokenizer, layers=args.layers, hidden=args.hidden, intermediate=args.hidden * 2,
                          heads=4, kv_heads=2, max_positions=4096, seed=args.seed)
    print(f"wrote {out}: vocab {len(tokenizer)}, {n:,d} params")


if __name__ == "__main__":
    main()
