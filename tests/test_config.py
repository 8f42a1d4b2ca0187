"""Config: YAML + overrides, LLaMA-Factory keys, did-you-mean, type checks, CLI exit codes."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jaxsft.config import ConfigError
from jaxsft.config_load import build_config, load_config
from jaxsft.main import cli, parse_args

REPO = Path(__file__).resolve().parents[1]
LF_DATA = (REPO / ".." / "shared" / "data" / "llamafactory").resolve()

# A LLaMA-Factory example SFT YAML (examples/train_lora/llama3_lora_sft.yaml), as users write it.
LLAMAFACTORY_LORA_SFT = """
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
trust_remote_code: false

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null
"""


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def lf_config(tmp_path, drop=()):
    values = yaml.safe_load(LLAMAFACTORY_LORA_SFT)
    for key in drop:
        values.pop(key)
    return write(tmp_path, yaml.safe_dump(values))


def test_llamafactory_yaml_loads_with_meanings(tmp_path):
    # save_only_model is an HF key jaxsft does not implement: the one edit this YAML needs.
    cfg = load_config(lf_config(tmp_path, drop=["save_only_model"]))
    assert cfg.finetuning_type == "lora" and cfg.lora_rank == 8 and cfg.lora_alpha == 16
    assert cfg.dataset == "identity,alpaca_en_demo" and cfg.cutoff_len == 2048
    assert cfg.learning_rate == pytest.approx(1e-4) and cfg.lr_scheduler_type == "cosine"
    assert cfg.compute_dtype == "bfloat16" and cfg.param_dtype == "float32"
    assert cfg.gradient_accumulation_steps == 8 and cfg.packing is False


def test_unsupported_llamafactory_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="key 'use_galore' is a LLaMA-Factory option that jaxsft does not support: "
                                          "GaLore is not available"):
        load_config(write(tmp_path, "use_galore: true\n"))


def test_llamafactory_keys_met_another_way_are_accepted_and_described(tmp_path):
    """Keys LLaMA-Factory's examples always carry load, and `describe` says how jaxsft meets each."""
    from jaxsft.main import describe

    path = write(tmp_path, LLAMAFACTORY_LORA_SFT.replace("trust_remote_code: false", "trust_remote_code: true")
                 .replace("save_only_model: false", "save_only_model: true")
                 + "deepspeed: examples/deepspeed/ds_z0_config.json\nexport_legacy_format: false\n"
                 + "export_device: cpu\n")
    cfg = load_config(path)
    assert cfg.save_only_model and cfg.trust_remote_code
    assert cfg.mesh == {"data": -1, "fsdp": 1, "tensor": 1}  # ZeRO-0: plain data parallelism
    notes = [line.strip() for line in describe(cfg).splitlines() if line.strip().startswith("note:")]
    assert [n.split("'")[1] for n in notes] == ["trust_remote_code", "deepspeed", "save_only_model",
                                                "ddp_timeout", "dataloader_num_workers", "export_device"]
    assert "note: 'deepspeed': ZeRO-0 -> mesh {data: -1}" in describe(cfg)


@pytest.mark.parametrize("deepspeed, mesh, says", [
    ("ds_z3_config.json", {"data": 1, "fsdp": -1, "tensor": 1}, "ZeRO-3 -> mesh {fsdp: -1}"),
    ("ds_z2_offload_config.json", {"data": 1, "fsdp": -1, "tensor": 1}, "ZeRO-2 -> mesh {fsdp: -1}"),
    ({"zero_optimization": {"stage": 0}}, {"data": -1, "fsdp": 1, "tensor": 1}, "ZeRO-0 -> mesh {data: -1}"),
    ("FILE", {"data": -1, "fsdp": 1, "tensor": 1}, "ZeRO-0"),  # a real file's stage wins over its name
])
def test_deepspeed_stage_picks_the_mesh(tmp_path, deepspeed, mesh, says):
    from jaxsft.config import met_settings
    from jaxsft.config_load import build_config

    if deepspeed == "FILE":
        deepspeed = str(tmp_path / "ds_z3_config.json")
        Path(deepspeed).write_text('{"zero_optimization": {"stage": 0}}')
    cfg = build_config({"deepspeed": deepspeed})
    assert cfg.mesh == mesh and says in met_settings(cfg)["deepspeed"]
    explicit = build_config({"deepspeed": deepspeed, "mesh": {"data": 2, "fsdp": 4}})
    assert explicit.mesh == {"data": 2, "fsdp": 4}


def test_typo_gets_did_you_mean(tmp_path):
    path = write(tmp_path, "lora_rnak: 8\n")
    with pytest.raises(ConfigError, match=r"unknown key 'lora_rnak', did you mean 'lora_rank'\?"):
        load_config(path)


def test_overrides_win_and_are_typed(tmp_path):
    path = lf_config(tmp_path, drop=["save_only_model"])
    cfg = load_config(path, ["lora_rank=16", "learning_rate=2e-5", "packing=true", "mesh.data=2"])
    assert cfg.lora_rank == 16 and cfg.lora_alpha == 32
    assert cfg.learning_rate == pytest.approx(2e-5)
    assert cfg.packing is True
    assert cfg.mesh == {"data": 2, "fsdp": -1, "tensor": 1}


@pytest.mark.parametrize("text, message", [
    ("lora_rank: eight\n", "key 'lora_rank': expected int, got 'eight'"),
    ("bf16: maybe\n", "key 'bf16': expected bool"),
    ("learning_rate: fast\n", "key 'learning_rate': expected float"),
    ("lr_scheduler_type: cosine_restarts\n", "key 'lr_scheduler_type': 'cosine_restarts' is not one of"),
    ("finetuning_type: qlora\n", "key 'finetuning_type': 'qlora' is not one of"),
    # LLaMA-Factory's own values are named before the keys that come with them (here oft_block_size).
    ("finetuning_type: oft\noft_block_size: 32\n", "key 'finetuning_type': 'oft' is not supported: OFT"),
    ("stage: dpo\npref_beta: 0.1\n", "key 'stage': 'dpo' is not supported: preference training"),
    # LLaMA-Factory's examples/megatron and examples/v1 configs
    ("tensor_model_parallel_size: 1\n", "key 'tensor_model_parallel_size' is a Megatron-Core option (LLaMA-Factory's "
                                        "USE_MCA=1 runs); jaxsft lays out devices with the `mesh` key instead"),
    ("model: Qwen/Qwen3-4B\nmodel_class: llm\npeft_config: {name: lora}\n",
     "a LLaMA-Factory v1 trainer config (USE_V1=1; keys model, model_class, peft_config); jaxsft reads"),
    ("fp8: true\n", "key 'fp8' is a LLaMA-Factory option that jaxsft does not support: FP8 training is not available"),
    ("evaluation_strategy: steps\n", "transformers renamed it eval_strategy (as LLaMA-Factory 0.9 reads it); use "
                                     "eval_strategy"),
    ("fp16: true\n", "key 'fp16': True is not supported, only False; use bf16: true"),
    ("export_legacy_format: true\n", "key 'export_legacy_format': True is not supported, only False: jaxsft "
                                     "exports safetensors only"),
    ("use_dora: true\nfinetuning_type: full\n", "key 'use_dora' is only valid with finetuning_type: lora"),
    ("use_llama_pro: true\nfinetuning_type: lora\n", "use_llama_pro needs finetuning_type: freeze"),
    ("mesh: {data: 2, fdsp: 4}\n", "unknown mesh axis 'fdsp', did you mean 'fsdp'?"),
    ("mesh: {data: -1, fsdp: -1}\n", "at most one axis may be -1"),
    ("cutoff_len: 0\n", "key 'cutoff_len' must be > 0"),
    ("do_train: true\nmodel_name_or_path: m\noutput_dir: o\ntemplate: llama3\n",
     "key 'dataset' is required with do_train"),
    ("deepspeed: {zero_optimization: {stage: 4}}\n", "key 'deepspeed': zero_optimization.stage 4 is not 0, 1, 2"),
    ("optim: lion\n", "key 'optim': 'lion' is not supported"),
    ("report_to: comet_ml\n", "key 'report_to': 'comet_ml' not supported; choose from tensorboard, wandb, mlflow"),
    ("- a\n- b\n", "the top level must be a mapping"),
])
def test_bad_config_messages(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert message in str(info.value)
    assert str(tmp_path) in str(info.value)  # errors name the file


def test_yaml_syntax_error_names_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))


def test_cli_accepts_llamafactory_style_flags():
    args = parse_args(["cfg.yaml", "lora_rank=4", "--learning_rate", "3e-4", "--bf16"])
    assert args.config == "cfg.yaml"
    assert args.overrides == ["lora_rank=4", "learning_rate=3e-4", "bf16=true"]
    # With --config, the value of a flag override is not taken for the config file.
    args = parse_args(["--config", "cfg.yaml", "--learning_rate", "3e-4", "--dry_run", "--lora_rank=4", "--bf16"])
    assert (args.config, args.dry_run) == ("cfg.yaml", True)
    assert args.overrides == ["learning_rate=3e-4", "lora_rank=4", "bf16=true"]
    args = parse_args(["--learning_rate", "3e-4", "--config=cfg.yaml", "--compile_for", "v5p-8"])
    assert args.config == "cfg.yaml"
    assert args.overrides == ["learning_rate=3e-4", "compile_for=v5p-8"]


def test_cli_error_exits_nonzero_with_message(tmp_path, capsys):
    assert cli(["--config", write(tmp_path, "lora_rnak: 8\n")]) == 2
    assert "unknown key 'lora_rnak', did you mean 'lora_rank'?" in capsys.readouterr().err


def test_cli_missing_file(capsys):
    assert cli(["--config", "/nonexistent/cfg.yaml"]) == 2
    assert "config file not found: /nonexistent/cfg.yaml" in capsys.readouterr().err


def test_main_module_reports_plan_and_exits_nonzero_on_error(tmp_path):
    path = lf_config(tmp_path, drop=["save_only_model"])
    local = [f"model_name_or_path={REPO / 'examples' / 'tiny-llama'}", f"dataset_dir={LF_DATA}",
             f"output_dir={tmp_path / 'out'}"]
    ok = subprocess.run([sys.executable, "-m", "jaxsft.main", "--config", path, "--dry_run", *local],
                        capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert "stages: train" in ok.stdout and "finetuning: lora (rank 8, alpha 16" in ok.stdout
    assert "'ddp_timeout' has no effect" in ok.stdout
    assert ok.stdout.endswith("dry run: config, paths, template, data and devices check out; nothing was run\n")
    # --dry_run runs the checks that need no weights: an unknown dataset is an error there too
    typo = subprocess.run([sys.executable, "-m", "jaxsft.main", "--config", path, "--dry_run", *local,
                           "dataset=identiy"], capture_output=True, text=True, cwd=REPO)
    assert typo.returncode == 2
    assert typo.stderr == (f"error: Unknown dataset 'identiy': not an entry of {LF_DATA}/dataset_info.json and no "
                           f"file or folder at that path. Did you mean identity? Datasets present in {LF_DATA}: "
                           f"alpaca_en_demo, glaive_toolcall_en_demo, identity.\n")
    bad = subprocess.run([sys.executable, "-m", "jaxsft.main", path, "lora_rnak=8"],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2
    assert "unknown key 'lora_rnak', did you mean 'lora_rank'?" in bad.stderr


def test_config_docs_are_current():
    result = subprocess.run([sys.executable, "tools/config_docs.py", "--check"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_hub_offline_reads_the_variables_as_huggingface_hub_does(monkeypatch):
    from jaxsft.config import hub_offline

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    assert not hub_offline() and not hub_offline("HF_DATASETS_OFFLINE")
    for value, offline in (("1", True), ("true", True), ("YES", True), ("0", False), ("false", False), ("", False)):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub_offline() is offline, value
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert not hub_offline() and hub_offline("HF_DATASETS_OFFLINE")


@pytest.mark.parametrize("text, message", [
    ("lora_rank: 4\nlearning_rate: 1e-4\nlora_rank: 8\n", "key 'lora_rank' is given twice (lines 1 and 3); keep one"),
    ("", "the file is empty (or only comments); put the run's keys in it, e.g. configs/ has examples"),
    ("# only a comment\n", "the file is empty (or only comments); put the run's keys in it, e.g. configs/ has "
                           "examples"),
])
def test_duplicate_keys_and_empty_files_are_errors(tmp_path, capsys, text, message):
    path = write(tmp_path, text)
    assert cli([path]) == 2
    assert capsys.readouterr().err == f"error: {path}: {message}\n"


def test_a_bad_override_names_the_command_line_not_the_file(tmp_path, capsys):
    path = write(tmp_path, "lora_rank: 4\n")
    assert cli([path, "lora_rank=eight"]) == 2
    assert capsys.readouterr().err == ("error: command-line override 'lora_rank=eight': key 'lora_rank': expected int, "
                                       "got 'eight' (str)\n")
    assert cli([path, "--lora_rnak", "3"]) == 2
    assert capsys.readouterr().err == ("error: command-line override 'lora_rnak=3': unknown key 'lora_rnak', did you "
                                       "mean 'lora_rank'?\n")
    assert cli([write(tmp_path, "lora_rank: eight\n")]) == 2  # in the file: the file is named
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}/")
    # a value that is well typed but out of range: still the override, not the file
    assert cli([path, "lora_rank=0"]) == 2
    assert capsys.readouterr().err == "error: command-line override 'lora_rank=0': key 'lora_rank' must be > 0, got 0\n"
    assert cli([write(tmp_path, "lora_rank: 0\n")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}/")
    # a value the shell split (unquoted braces) is one line, not a YAML traceback
    assert cli([path, "mesh={data:", "3}"]) == 2
    assert capsys.readouterr().err == (
        "error: command-line override 'mesh={data:': the value is not valid YAML (expected the node content, but "
        "found '<stream end>'); quote the whole override for the shell, e.g. 'mesh={data: 2, fsdp: -1}'\n")


RUN_KEYS = {"do_train": True, "model_name_or_path": "m", "output_dir": "o", "template": "llama3", "dataset": "d"}


def test_step_intervals_read_like_hugging_face():
    """save_steps / eval_steps / logging_steps below 1 are ratios of the run (they were truncated to 0 and
    silently never saved or evaluated); eval_steps 0 or unset is logging_steps; no epochs and no max_steps is
    an error, not a run that trains nothing."""
    from jaxsft.config import every_n_steps
    assert [every_n_steps(v, 95) for v in (0.1, 0.5, 1, 20, 0.001)] == [10, 48, 1, 20, 1]
    assert build_config({"logging_steps": 7, "eval_steps": 0}).eval_steps == 7
    with pytest.raises(ConfigError, match=r"^key 'num_train_epochs' must be > 0 when max_steps is not set, got 0.0$"):
        build_config({**RUN_KEYS, "num_train_epochs": 0})
    assert build_config({**RUN_KEYS, "num_train_epochs": 0, "max_steps": 5}).max_steps == 5



def test_unquoted_no_strategy_reads_as_no(tmp_path):
    """YAML 1.1 reads `save_strategy: no` as false; LLaMA-Factory users write it unquoted."""
    path = tmp_path / "cfg.yaml"
    path.write_text("save_strategy: no\neval_strategy: no\n")
    cfg = load_config(str(path), ["save_strategy=no"])
    assert (cfg.save_strategy, cfg.eval_strategy) == ("no", "no")
    cfg = load_config(str(path))
    assert (cfg.save_strategy, cfg.eval_strategy) == ("no", "no")
    with pytest.raises(ConfigError, match="do_train"):
        load_config(str(path), ["do_train=maybe"])
