"""One conversation -> (input_ids, labels), exactly as LLaMA-Factory 0.9.5 `SupervisedDatasetProcessor`."""

from jaxsft.data.formats import Conversation
from jaxsft.data.templates import Encoder

IGNORE_INDEX = -100


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LF's truncation budget for one (prompt, response) pair given `cutoff_len` tokens left."""
    if target_len * 2 < cutoff_len:  # truncate the source
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:  # truncate the target
        max_target_len = cutoff_len - source_len
    else:  # truncate both, in proportion
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


def encode_supervised(
    conversation: Conversation, tokenizer, template: Encoder, cutoff_len: int, train_on_prompt: bool = False,
    mask_history: bool = False, preserve_thinking: bool = False, sizes: dict | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE_INDEX where nothing is learned) of one conversation.

    Pairs are truncated turn by turn with `infer_seqlen`; with `mask_history` they are visited last-first (the
    last turn wins the budget and alone keeps labels) and put back in order. `efficient_eos` templates learn
    the EOS closing each answer on the first token of the next prompt and append one final EOS.
    `sizes`, when given, receives `full`: the length before truncation (so callers count what cutoff_len cut),
    and `prompt_learned`: the targets inside prompts (train_on_prompt; not efficient_eos's EOS of the answer
    before, which is the answer's).
    """
    pairs = template.encode_multiturn(
        tokenizer, conversation.messages, conversation.system, conversation.tools,
        discarding_history_cot=mask_history and not preserve_thinking,
    )
    eos = tokenizer.eos_token_id
    if sizes is not None:
        sizes["full"] = sum(len(s) + len(t) for s, t in pairs) + (1 if template.efficient_eos else 0)
    input_ids: list[int] = []
    labels: list[int] = []
    prompt_learned = 0
    total_length = 1 if template.efficient_eos else 0
    if mask_history:
        pairs = pairs[::-1]
    for turn_idx, (source_ids, target_ids) in enumerate(pairs):
        if total_length >= cutoff_len:
            break
        source_len, target_len = infer_seqlen(len(source_ids), len(target_ids), cutoff_len - total_length)
        source_ids, target_ids = source_ids[:source_len], target_ids[:target_len]
        total_length += source_len + target_len
        if train_on_prompt:
            source_label = source_ids
            # every prompt token is a target but the row's first (predicted by nothing); never with mask_history
            prompt_learned += source_len - (1 if turn_idx == 0 and source_len else 0)
        elif template.efficient_eos and turn_idx != 0 and source_len > 0:  # LF has no `source_len > 0`: an
            source_label = [eos] + [IGNORE_INDEX] * (source_len - 1)  # empty prompt would misalign its labels
        else:
            source_label = [IGNORE_INDEX] * source_len
        target_label = [IGNORE_INDEX] * target_len if mask_history and turn_idx != 0 else target_ids
        if mask_history:
            input_ids = source_ids + target_ids + input_ids
            labels = source_label + target_label + labels
        else:
            input_ids += source_ids + target_ids
            labels += source_label + target_label
    if template.efficient_eos:
        input_ids += [eos]
        labels += [eos]
    if sizes is not None:
        sizes["prompt_learned"] = prompt_learned
    return input_ids, labels


def encode_text(text: str, tokenizer, cutoff_len: int, sizes: dict | None = None, template_name: str = "empty"
                ) -> tuple[list[int], list[int]]:
    """Plain text as LLaMA-Factory's pre-training stage (unpacked) encodes it: BOS when the tokenizer adds one,
    the text, EOS (the template's; `<|end_of_text|>` for llama3, whose template EOS ends a turn, not a
    document), cut at `cutoff_len`; every token is a label."""
    eos = tokenizer.encode("<|end_of_text|>", add_special_tokens=False) if template_name == "llama3" \
        else [tokenizer.eos_token_id]
    ids = tokenizer.encode(text, add_special_tokens=False) + eos
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if sizes is not None:
        sizes["full"], sizes["prompt_learned"] = len(ids), 0  # a document, not a prompt: learning it is the point
    ids = ids[:cutoff_len]
    return ids, list(ids)
