"""One conversation -> (input_ids, labels), exactly as LLaMA-Factory 0.9.5 `SupervisedDatasetProcessor`;
`encode_weighted` adds the per-token loss weights of answers marked `train: false` / `weight: w`.

Rules for marked answers (jaxsft's own; LF has no such marks):
- an answer of weight 0 (`train: false`) is never learned, also with `train_on_prompt` (which un-masks the
  prompts, not answers the data marks as not to learn);
- an answer of weight w is learned with each of its label tokens weighted w; with `efficient_eos` templates
  the EOS closing it (learned on the next prompt's first token, or appended at the end) is part of it;
- `mask_history` masks every answer but the last, whatever its weight; the last keeps its weight (a last
  answer marked `train: false` leaves nothing to learn and the example is dropped);
- prompt tokens learned with `train_on_prompt` have weight 1.
"""

import numpy as np

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
    """Token ids and labels (IGNORE_INDEX where nothing is learned) of one conversation (`encode_weighted`
    without the weights)."""
    ids, labels, _ = encode_weighted(conversation, tokenizer, template, cutoff_len, train_on_prompt, mask_history,
                                     preserve_thinking, sizes)
    return ids, labels


def encode_weighted(
    conversation: Conversation, tokenizer, template: Encoder, cutoff_len: int, train_on_prompt: bool = False,
    mask_history: bool = False, preserve_thinking: bool = False, sizes: dict | None = None,
) -> tuple[list[int], list[int], np.ndarray | None]:
    """Token ids, labels (IGNORE_INDEX where nothing is learned) and loss weights of one conversation.

    The weights are float32 per position (the weight of that position's label, 0 where it is IGNORE_INDEX),
    or None when every label has weight 1 (no answer carries a weight other than 0 or 1).

    Pairs are truncated turn by turn with `infer_seqlen`; with `mask_history` they are visited last-first (the
    last turn wins the budget and alone keeps labels) and put back in order. `efficient_eos` templates learn
    the EOS closing each answer on the first token of the next prompt and append one final EOS.
    `sizes`, when given, receives `full`: the length before truncation (so callers count what cutoff_len cut),
    `prompt_learned`: the targets inside prompts (train_on_prompt; not efficient_eos's EOS of the answer
    before, which is the answer's) and `unlearned_answers`: the answers marked train: false or weight 0.
    """
    pairs = template.encode_multiturn(
        tokenizer, conversation.messages, conversation.system, conversation.tools,
        discarding_history_cot=mask_history and not preserve_thinking,
    )
    eos = tokenizer.eos_token_id
    answer_weights = [m.weight for m in conversation.messages[1::2]]
    weighted = any(w != 1.0 for w in answer_weights)  # else: LF's encoding, no weights built
    if sizes is not None:
        sizes["full"] = sum(len(s) + len(t) for s, t in pairs) + (1 if template.efficient_eos else 0)
    input_ids: list[int] = []
    labels: list[int] = []
    prompt_learned = 0
    weights: list[float] = []  # per position, aligned with labels
    total_length = 1 if template.efficient_eos else 0
    order = list(range(len(pairs)))
    if mask_history:
        order = order[::-1]
    last = order[0] if order else 0  # the answer whose tokens end the output (its EOS is the appended one)
    for turn_idx, k in enumerate(order):
        source_ids, target_ids = pairs[k]
        w = answer_weights[k] if k < len(answer_weights) else 1.0
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
        source_weight = target_weight = []
        if weighted:
            source_label, source_weight, target_label, target_weight = _weigh(
                source_label, target_label, w, answer_weights[k - 1] if 0 < k <= len(answer_weights) else 1.0,
                closes_answer=not train_on_prompt and template.efficient_eos and turn_idx != 0 and source_len > 0)
        if not mask_history:
            last = k
        if mask_history:
            input_ids = source_ids + target_ids + input_ids
            labels = source_label + target_label + labels
            weights = source_weight + target_weight + weights
        else:
            input_ids += source_ids + target_ids
            labels += source_label + target_label
            weights += source_weight + target_weight
    if template.efficient_eos:
        w = answer_weights[last] if last < len(answer_weights) else 1.0
        input_ids += [eos]
        labels += [eos if w else IGNORE_INDEX]
        weights += [w]
    if sizes is not None:
        sizes["prompt_learned"] = prompt_learned
        sizes["unlearned_answers"] = sum(w == 0 for w in answer_weights)
    if not weighted or all(x in (0.0, 1.0) for x in weights):
        return input_ids, labels, None
    return input_ids, labels, np.asarray(weights, np.float32)


def _weigh(source_label: list[int], target_label: list[int], w: float, previous_w: float, closes_answer: bool
           ) -> tuple[list[int], list[float], list[int], list[float]]:
    """One pair's labels and weights given its answer's weight `w`: weight 0 masks the answer; the EOS label
    that `closes_answer` (efficient_eos: the previous answer's end, on this prompt's first token) takes the
    previous answer's weight `previous_w`; learned prompt tokens (train_on_prompt) weigh 1."""
    if closes_answer and previous_w == 0:
        source_label = [IGNORE_INDEX] * len(source_label)
    source_weight = [0.0 if lab == IGNORE_INDEX else 1.0 for lab in source_label]
    if closes_answer and source_weight and source_weight[0]:
        source_weight[0] = previous_w
    if w == 0:
        target_label = [IGNORE_INDEX] * len(target_label)
    target_weight = [0.0 if lab == IGNORE_INDEX else w for lab in target_label]
    return source_label, source_weight, target_label, target_weight


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
