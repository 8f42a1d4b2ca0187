"""`validate_run(cfg)`: everything that can be checked before JAX compiles or weights load.

The model directory (config.json a supported model, safetensors weights), the template, the datasets,
the output directory and, when asked, the mesh and batch against the devices. Each problem is a
`UserError` whose message names the key or file and says how to fix it.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import tempfile
from pathlib import Path

from jaxsft.config import Config, hub_offline
from jaxsft.errors import ConfigError, InputError, MissingPath, UserError

CHECKPOINT_DIR = re.compile(r"checkpoint_(\d+)$")  # orbax's committed step dirs (tmp ones carry a suffix)


def validate_run(cfg: Config, *, devices: bool = True, read_rows: bool = False) -> None:
    """Raise a UserError for the first thing that would make the configured stages fail.

    `devices=False` skips the mesh and batch checks, which start JAX's runtime. `read_rows` (--dry_run) also
    reads the first rows of each local dataset (a real run reads them all when it builds the data).
    """
    if cfg.export_dir:
        check_export_dir(cfg)
    if not (cfg.do_train or cfg.do_eval or cfg.do_predict):
        if cfg.export_dir and cfg.model_name_or_path:  # an export alone (LLaMA-Factory's merge_lora examples)
            check_model_dir(cfg.model_name_or_path)
            check_adapter(cfg)
            if cfg.export_adapter and not cfg.adapter_name_or_path:
                raise ConfigError("export_adapter: true writes the LoRA adapter, and an export alone has one only from "
                                  "adapter_name_or_path, which is not set; set it, or export_adapter: false to write "
                                  "the model")
        return
    tokenized = cfg.tokenized_path and Path(cfg.tokenized_path).is_dir() and any(Path(cfg.tokenized_path).iterdir())
    if cfg.do_train and cfg.eval_strategy != "no" and not (cfg.eval_dataset or cfg.val_size > 0 or tokenized
                                                              or cfg.retention_dataset):
        raise ConfigError(f"eval_strategy: {cfg.eval_strategy} needs evaluation data: set eval_dataset, or val_size "
                          f"to hold out part of dataset, or retention_dataset (or eval_strategy: no)")
    model_dir = check_model_dir(cfg.model_name_or_path)
    check_adapter(cfg)
    check_template(cfg.template, cfg.tool_format, model_dir)
    check_datasets(cfg, read_rows)
    check_output_dir(cfg)
    if devices:
        check_devices(cfg, model_dir)


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not name.endswith("/")


def check_model_dir(name_or_path: str) -> Path | None:
    """The local model directory, checked; None for a hub id that will be downloaded."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        if _looks_like_hub_id(name_or_path) and not hub_offline():
            from jaxsft.hub import cached_snapshot, hub_endpoint, hub_unreachable

            why = hub_unreachable()
            if why is None or cached_snapshot(name_or_path):
                return None
            raise MissingPath(f"model_name_or_path: {name_or_path} is not a local directory, not in the Hugging Face "
                              f"cache, and the hub ({hub_endpoint()}) cannot be reached ({why}); download it where "
                              f"there is network and give its local directory")
        hint = (" (HF_HUB_OFFLINE is set, so a hub id cannot be downloaded)" if _looks_like_hub_id(name_or_path)
                else "")
        raise MissingPath(f"model_name_or_path: {name_or_path} does not exist{hint}; give a local Hugging Face "
                          f"model directory (config.json, tokenizer files, *.safetensors)")
    if not path.is_dir():
        raise ConfigError(f"model_name_or_path: {name_or_path} is a file; give the model's directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        if (path / "adapter_config.json").is_file():
            raise ConfigError(f"model_name_or_path: {path} holds a LoRA adapter, not a model; set "
                              f"adapter_name_or_path: {path} and model_name_or_path to its base model")
        if _is_jaxsft_checkpoint(path):
            raise ConfigError(f"model_name_or_path: {path} is a jaxsft training checkpoint, not a Hugging Face "
                              f"model; {_CHECKPOINT_USE.format(path=path)}")
        raise MissingPath(f"model_name_or_path: no config.json in {path}; a Hugging Face model directory holds "
                          f"config.json, tokenizer files and *.safetensors")
    try:
        from jaxsft.model.config import ModelConfig
        ModelConfig.from_hf(json.loads(config_file.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as e:  # json errors are ValueErrors
        detail = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise InputError(f"{config_file}: {detail}") from None
    if not (path / "model.safetensors.index.json").is_file() and not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        hint = (f" It has {', '.join(pickles)}: pickled PyTorch weights are never loaded (unpickling runs code); "
                "convert them to safetensors first, e.g. `AutoModelForCausalLM.from_pretrained(dir)"
                ".save_pretrained(out, safe_serialization=True)` in a trusted environment." if pickles else "")
        raise MissingPath(f"model_name_or_path: no *.safetensors in {path}.{hint}")
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors(weights)
    if not any((path / name).is_file() for name in TOKENIZER_FILES) and not any(path.glob("*.tiktoken")):
        raise MissingPath(f"model_name_or_path: no tokenizer files in {path} (one of {', '.join(TOKENIZER_FILES)}); "
                          f"copy the tokenizer of the model's original release into it")
    check_tokenizer_code(path)
    return path


_CHECKPOINT_USE = ("eval, predict and chat read it as resume_from_checkpoint: {path} (with the run's finetuning_type); "
                   "`python tools/convert_checkpoint.py --checkpoint {path} --export_dir DIR` exports it")


def _is_jaxsft_checkpoint(path: Path) -> bool:
    """A `checkpoint_<step>` dir orbax wrote, or an output_dir holding them (and no exported model)."""
    if CHECKPOINT_DIR.match(path.name):
        return (path / "_CHECKPOINT_METADATA").exists() or (path / "commit_success.txt").exists()
    return bool(_committed_steps(path))


def check_adapter(cfg: Config) -> None:
    """adapter_name_or_path (when set and not resuming a checkpoint, which holds the adapter) is a PEFT LoRA
    adapter jaxsft applies; a path to something else (missing, a jaxsft checkpoint, a full model) says what it
    is and what to set instead."""
    if not cfg.adapter_name_or_path or cfg.resume_from_checkpoint:
        return
    from jaxsft.lora import check_adapter_dir

    name = str(cfg.adapter_name_or_path)
    path = Path(name).expanduser()
    if "," in name and not path.exists():
        check_adapter_dir(name)  # says that one adapter is supported
    if not path.exists():
        hub = (" (adapters are read from local directories: download it first, e.g. `huggingface-cli download "
               f"{name} --local-dir DIR`)" if _looks_like_hub_id(name) else "")
        raise MissingPath(f"adapter_name_or_path: {name} does not exist{hub}; give a PEFT adapter directory "
                          f"(adapter_config.json + adapter_model.safetensors), e.g. a LoRA run's output_dir")
    if not path.is_dir():
        raise ConfigError(f"adapter_name_or_path: {name} is a file; give the adapter's directory")
    if (path / "adapter_config.json").is_file():
        if cfg.export_dir and Path(cfg.export_dir).expanduser().resolve() == path.resolve():
            raise ConfigError(f"export_dir: {cfg.export_dir} is the directory of adapter_name_or_path; the merged "
                              f"model would replace the adapter: choose another export_dir")
        check_adapter_dir(path)
        return
    if (path / "config.json").is_file():
        raise ConfigError(f"adapter_name_or_path: {name} holds a full model (config.json), not a LoRA adapter; "
                          f"set model_name_or_path: {name} and remove adapter_name_or_path")
    if _is_jaxsft_checkpoint(path):
        raise ConfigError(f"adapter_name_or_path: {name} is a jaxsft training checkpoint, not a PEFT adapter; "
                          + _CHECKPOINT_USE.format(path=name))
    raise MissingPath(f"adapter_name_or_path: {name} is not a PEFT adapter directory: no adapter_config.json in it")


def check_tokenizer_code(model_dir: Path) -> None:
    """A tokenizer that exists only as code shipped with the model (`auto_map` with no class transformers
    has) is refused by name: jaxsft never executes such code, whatever `trust_remote_code` says."""
    config = model_dir / "tokenizer_config.json"
    if not config.is_file():
        return
    try:
        values = json.loads(config.read_text(encoding="utf-8"))
    except ValueError:
        raise InputError(f"{config} is not valid JSON") from None
    remote = (values.get("auto_map") or {}).get("AutoTokenizer")
    if not remote:
        return
    import transformers

    name = values.get("tokenizer_class") or ""
    if name and (hasattr(transformers, name) or hasattr(transformers, name.removesuffix("Fast"))):
        return  # transformers has the class itself and uses it without the shipped code
    shipped = ", ".join(str(r) for r in (remote if isinstance(remote, list) else [remote]) if r)
    raise ConfigError(f"model_name_or_path: the tokenizer of {model_dir} needs custom code shipped with the model "
                      f"({config.name}: auto_map AutoTokenizer -> {shipped}), and jaxsft never executes such code "
                      f"(trust_remote_code is not honoured); use a model whose tokenizer transformers provides "
                      f"(a tokenizer.json and a built-in tokenizer_class)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def check_safetensors(file: Path) -> None:
    """The header parses and the file holds every byte the header points to (a truncated download does not)."""
    size = file.stat().st_size
    try:
        with file.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if size < 8 or header_len <= 0 or 8 + header_len > size:
                raise ValueError("the header runs past the end of the file")
            header = json.loads(f.read(header_len))
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise InputError(f"{file} is not a readable safetensors file ({e}); download it again") from None
    if 8 + header_len + end > size:
        raise InputError(f"{file} is truncated: {size} bytes, but its header needs {8 + header_len + end}; "
                         f"download it again")


def _has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    config = model_dir / "tokenizer_config.json"
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except ValueError:
        raise InputError(f"{config} is not valid JSON") from None


def check_template(name: str, tool_format: str | None, model_dir: Path | None) -> None:
    from jaxsft.data.templates import TEMPLATES
    from jaxsft.data.tool_format import TOOL_FORMATS

    if name == "auto":
        if model_dir is not None and not _has_chat_template(model_dir):
            raise ConfigError(f"template: auto needs a tokenizer with a chat_template, and {model_dir} has none "
                              f"(tokenizer_config.json, chat_template.jinja). Pick a named template: "
                              f"{', '.join(sorted(TEMPLATES))}.")
    elif name not in TEMPLATES:
        raise ConfigError(f"template: unknown template {name!r}. Known templates: auto, "
                          f"{', '.join(sorted(TEMPLATES))}.")
    if tool_format is not None and tool_format not in TOOL_FORMATS:
        raise ConfigError(f"tool_format: unknown {tool_format!r}. Known: {', '.join(sorted(TOOL_FORMATS))}.")


def check_datasets(cfg: Config, read_rows: bool = False) -> None:
    """Every name in dataset / eval_dataset resolves (registry entry or path) and its file exists; with
    `read_rows`, the first rows of the local ones have the registry's columns and convert."""
    from jaxsft.data.registry import REGISTRY
    from jaxsft.data.sources import resolve

    tokenized = Path(cfg.tokenized_path) if cfg.tokenized_path else None
    if tokenized is not None and tokenized.exists() and not tokenized.is_dir():
        raise ConfigError(f"tokenized_path: {tokenized} is a file; give a folder (an empty or new one is filled "
                          f"with the tokenized data)")
    if tokenized is not None and tokenized.is_dir() and any(tokenized.iterdir()):
        if not any((tokenized / name).is_file() for name in ("dataset_dict.json", "state.json")):
            raise InputError(f"tokenized_path: {tokenized} holds files but no saved dataset (no dataset_dict.json or "
                             f"state.json); point tokenized_path at a new folder to tokenize into it")
        return  # the tokenized data replaces the datasets
    directory = Path(cfg.dataset_dir)
    named = any(getattr(cfg, key) for key in ("dataset", "eval_dataset", "retention_dataset", "replay_dataset"))
    if named and str(cfg.dataset_dir).startswith("REMOTE:"):  # LF reads dataset_info.json from a hub repo
        repo = str(cfg.dataset_dir).removeprefix("REMOTE:")
        raise ConfigError(f"dataset_dir: {cfg.dataset_dir} is LLaMA-Factory's hub form, which jaxsft does not "
                          f"download; fetch the repo where there is network (`hf download {repo} --repo-type dataset "
                          f"--local-dir DIR`) and set dataset_dir: DIR")
    for key in ("dataset", "eval_dataset", "retention_dataset", "replay_dataset"):
        names = getattr(cfg, key)
        if not names:
            continue
        try:
            attrs = resolve(names, cfg.dataset_dir)
        except UserError as e:
            if cfg.dataset_dir != "ONLINE" and not directory.is_dir():
                raise MissingPath(f"dataset_dir: {cfg.dataset_dir} does not exist ({directory.absolute()}); it "
                                  f"should hold {REGISTRY} and the data files. {key}: {e}") from None
            if key in ("retention_dataset", "replay_dataset"):  # the message names the dataset, not the key
                raise InputError(f"{key}: {e}") from None
            raise
        hub = [a for a in attrs if a.load_from == "hf_hub"]
        if hub and not hub_offline("HF_DATASETS_OFFLINE"):
            from jaxsft.hub import hub_endpoint, hub_unreachable

            why = hub_unreachable()
            if why is not None:
                raise MissingPath(f"{key}: {hub[0].name!r} is a hub dataset ({hub[0].path}) and the hub "
                                  f"({hub_endpoint()}) cannot be reached ({why}); download it where there is network "
                                  f"and name the local copy (or set HF_DATASETS_OFFLINE=1 to read the datasets cache)")
        if read_rows:
            check_first_rows(cfg, [a for a in attrs if a.load_from != "hf_hub"])


def check_first_rows(cfg: Config, attrs: list, n: int = 100) -> None:
    """The first `n` rows of each dataset: the columns the registry names exist, and each row converts to a
    conversation (a malformed row is the error the real run would stop at, unless skip_invalid_examples)."""
    from jaxsft.data import sources
    from jaxsft.data.formats import InvalidExample, to_conversation

    for attr in attrs:
        sources.check_head_columns(attr, n)
        for i, row in enumerate(itertools.islice(sources.iter_rows(attr), n)):
            try:
                to_conversation(row, attr, attr.path, i)
            except InvalidExample as e:
                if e.kind == "malformed" and not cfg.skip_invalid_examples:
                    raise


def _committed_steps(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if p.is_dir() and (m := CHECKPOINT_DIR.match(p.name)))


def _check_writable(key: str, directory: Path) -> None:
    """`directory` (or, when it does not exist yet, its nearest existing parent) is a folder we can write in."""
    probe = directory
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == directory else f"is inside {probe}, which is a file"
        raise ConfigError(f"{key}: {directory} {where}; give a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ConfigError(f"{key}: cannot write in {probe} ({e.strerror}); give a directory you can write to") \
            from None


MODEL_FILES = ("config.json", "adapter_config.json", "model.safetensors.index.json")


def check_export_dir(cfg: Config) -> None:
    """export_dir is writable and holds no model unless overwrite_output_dir says to replace it."""
    export = Path(cfg.export_dir)
    _check_writable("export_dir", export)
    held = [n for n in MODEL_FILES if (export / n).is_file()] + sorted(p.name for p in export.glob("*.safetensors")) \
        if export.is_dir() else []
    if held and not any(n in held for n in ("config.json", "adapter_config.json")):
        # The config is written last (jaxsft.export): weights without it are an export a kill cut short, which
        # no loader takes for a model; the rerun replaces it.
        logging.getLogger("jaxsft").warning("export_dir: %s holds an unfinished export (%s without a config); it is "
                                            "replaced", export, ", ".join(held[:3]))
        return
    if held and not cfg.overwrite_output_dir:
        raise ConfigError(f"export_dir: {export} already holds a model ({', '.join(held[:3])}); set "
                          f"overwrite_output_dir: true to replace it, or choose another export_dir")


def check_output_dir(cfg: Config) -> None:
    out = Path(cfg.output_dir)
    _check_writable("output_dir", out)
    resume = cfg.resume_from_checkpoint
    resuming = resume not in (None, False) and str(resume).lower() != "false"
    steps = _committed_steps(out)
    if cfg.do_train and not resuming and not cfg.overwrite_output_dir and steps:
        held = ", ".join(f"checkpoint_{s}" for s in steps)
        raise ConfigError(f"output_dir {out} already holds checkpoints ({held}); "
                          f"set resume_from_checkpoint: true to continue, or overwrite_output_dir: true to start over")
    if resuming and (cfg.do_train or cfg.do_eval or cfg.do_predict):  # eval / predict read that checkpoint too
        target = out if resume is True or str(resume).lower() == "true" else Path(str(resume))
        instead = ("train without resume_from_checkpoint to start from step 0" if cfg.do_train else
                   "remove resume_from_checkpoint to use model_name_or_path (+ adapter_name_or_path) as it is")
        if CHECKPOINT_DIR.match(target.name):
            if not target.is_dir():
                raise MissingPath(f"resume_from_checkpoint: {target} does not exist; checkpoints there: "
                                  f"{_committed_steps(target.parent) or 'none'}")
        elif not _committed_steps(target):
            raise MissingPath(f"resume_from_checkpoint: no complete checkpoint in {target}; {instead}")


def check_devices(cfg: Config, model_dir: Path | None = None) -> None:
    """The mesh fits the devices (and the local model's experts) and the batches split over processes
    (starts JAX, compiles nothing)."""
    from jaxsft.model.hf import load_hf_config
    from jaxsft.runtime import build_mesh, init_distributed, rows_per_process
    from jaxsft.sharding import check_expert_axis

    init_distributed(cfg)
    mesh = build_mesh(cfg)
    if model_dir is not None:
        check_expert_axis(mesh, load_hf_config(model_dir).num_experts)
    rows_per_process(cfg, mesh, cfg.per_device_train_batch_size)
    rows_per_process(cfg, mesh, cfg.per_device_eval_batch_size)
