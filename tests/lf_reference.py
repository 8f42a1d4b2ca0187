"""What LLaMA-Factory 0.9.5 does, restated independently of jaxsft's code under test."""


def lf_stop_ids(tokenizer) -> list[int]:
    """LF 0.9.5 run_sft's gen_kwargs['eos_token_id'] (transformers > 4.58 branch): the EOS, then the
    additional special tokens."""
    extra = getattr(tokenizer, "additional_special_tokens_ids", None)
    if not isinstance(extra, list):
        extra = tokenizer.convert_tokens_to_ids([str(t) for t in getattr(tokenizer, "_extra_special_tokens", [])])
    return list(dict.fromkeys([tokenizer.eos_token_id] + [i for i in extra if i != -1]))
