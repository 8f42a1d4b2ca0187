"""Chat in the terminal with a model, as `llamafactory-cli chat` does: multi-turn history, streamed answers.

    jaxsft chat cfg.yaml [key=value ...]                            # model_name_or_path (+ adapter_name_or_path)
    python tools/chat.py --config cfg.yaml [key=value ...]          # the same
    python tools/chat.py --checkpoint saves/run/checkpoint_100      # a jaxsft checkpoint (its own config)
    python tools/chat.py --config cfg.yaml --checkpoint saves/run   # the latest checkpoint in a run's output_dir

Type `clear` to forget the history and `exit` (or end the input) to quit. Generation follows the
config's `do_sample`, `temperature`, `top_p`, `top_k`, `max_new_tokens` (LF's defaults sample); the
prompt is the template's rendering of the history plus an empty answer, as LF's chat engine builds it.
"""

from __future__ import annotations

import argparse
import sys

from jaxsft.config import Config, ConfigError
from jaxsft.config_load import build_config, load_config
from jaxsft.errors import UserError, report

WELCOME = "Welcome to the CLI application, use `clear` to remove the history, use `exit` to exit the application."


def chat_config(config: str | None, checkpoint: str | None, overrides: list[str]) -> Config:
    """The YAML (+ overrides); with only a checkpoint, the config it was trained with (+ overrides)."""
    if config is None and checkpoint is not None:
        from jaxsft.checkpoint import Checkpoints, find_checkpoint
        from jaxsft.config_load import parse_override

        directory, step = find_checkpoint(checkpoint)
        values = Checkpoints(directory, async_save=False).restore_config(step)
        values.update(parse_override(text) for text in overrides)
        return build_config(values)
    cfg = load_config(config, overrides)
    if cfg.model_name_or_path is None or cfg.template is None:
        raise ConfigError("chat needs model_name_or_path and template (in the YAML or as key=value)")
    return cfg


class Streamer:
    """Prints the decoded answer as tokens arrive; holds back an incomplete UTF-8 character."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.tokens: list[int] = []
        self.printed = ""

    def __call__(self, row: int, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip)
        if text.endswith("\ufffd") or not text.startswith(self.printed):
            return
        print(text[len(self.printed):], end="", flush=True)
        self.printed = text

    def finish(self) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip)
        if text.startswith(self.printed):
            print(text[len(self.printed):], end="", flush=True)
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (model, template, generation keys)")
    parser.add_argument("--checkpoint", help="a jaxsft output_dir (latest checkpoint) or checkpoint_<step> dir")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = chat_config(args.config, args.checkpoint, args.overrides)
        if args.checkpoint is None:  # the model and adapter, checked before any weights load
            from jaxsft.preflight import check_adapter, check_model_dir

            check_model_dir(cfg.model_name_or_path)
            check_adapter(cfg)
    except (UserError, FileNotFoundError) as e:
        return report(e)

    import jax

    from jaxsft.checkpoint import find_checkpoint
    from jaxsft.data.templates import get_template
    from jaxsft.predict import generation_params, stop_token_ids
    from jaxsft.resume import resume_target
    from jaxsft.runtime import build_mesh, load_model_for, load_tokenizer

    # --checkpoint, else the config's resume_from_checkpoint (as eval and predict read it), else the HF model.
    checkpoint = find_checkpoint(args.checkpoint) if args.checkpoint else resume_target(cfg)
    mesh = build_mesh(cfg)
    tokenizer = load_tokenizer(cfg)
    template = get_template(cfg.template, tokenizer, default_system=cfg.default_system,
                            enable_thinking=cfg.enable_thinking, tool_format=cfg.tool_format)
    model = load_model_for(cfg, mesh, None, checkpoint)
    if checkpoint is not None:
        print(f"chatting with {checkpoint[0]}/checkpoint_{checkpoint[1]}", flush=True)
    params = generation_params(model)
    stop = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rng = jax.random.key(cfg.seed)

    print(WELCOME)
    try:
        _converse(cfg, model, params, tokenizer, template, stop, pad_id, rng)
    except KeyboardInterrupt:  # Ctrl-C at the prompt or mid-answer: leave as `exit` does
        print(flush=True)
        return 130
    return 0


def _converse(cfg: Config, model, params, tokenizer, template, stop, pad_id, rng) -> None:
    """The read-answer loop, until `exit` or the end of the input."""
    import jax

    from jaxsft.data.formats import Conversation, Message
    from jaxsft.data.prompts import encode_oneturn
    from jaxsft.generate import generate
    from jaxsft.predict import sampling_of
    from jaxsft.runtime import DTYPES, resolve_attention_impl

    history: list[Message] = []
    while True:
        try:
            query = input("\nUser: ")
        except EOFError:
            break
        if query.strip() == "exit":
            break
        if query.strip() == "clear":
            history = []
            print("History has been removed.")
            continue
        history.append(Message("user", query))
        conversation = Conversation("", "", history + [Message("assistant", "")])
        prompt_ids, _ = encode_oneturn(conversation, tokenizer, template)
        print("Assistant: ", end="", flush=True)
        streamer = Streamer(tokenizer, cfg.skip_special_tokens)
        rng, turn_rng = jax.random.split(rng)
        try:
            generate(params, model.config, [prompt_ids], max_new_tokens=cfg.max_new_tokens,
                     sampling=sampling_of(cfg), stop_token_ids=stop, rng=turn_rng, pad_id=pad_id,
                     compute_dtype=DTYPES[cfg.compute_dtype],
                     attention_impl=resolve_attention_impl(cfg.attention_impl, decode=True),
                     on_token=streamer)
        except ValueError as e:  # e.g. the history outgrew max_position_embeddings
            history.pop()
            print(f"\nerror: {e}; type `clear` to start over")
            continue
        response = streamer.finish()
        print()
        history.append(Message("assistant", response))


if __name__ == "__main__":
    sys.exit(main())
