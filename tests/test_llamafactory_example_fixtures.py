"""Every LLaMA-Factory example YAML stored in fixtures/llamafactory_examples (its upstream `examples/` tree,
see the README there), through the CLI with only what is specific to this machine changed: each one either
passes `--dry_run` (config, paths, template, the first data rows; no weights) or is refused by one `error:`
line that names the key or value and what to use instead. No example may be accepted with a key ignored:
adding a fixture means saying here what jaxsft does with it."""

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from test_llamafactory_examples import DATA_DIR, tiny_model

from jaxsft.main import cli

FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory_examples"

_PT = ("key 'stage': 'pt' is not supported: continued pre-training (stage: pt) is not available; jaxsft runs stage: "
       "sft, which trains a plain-text dataset")
_QLORA = "key 'quantization_bit' is a LLaMA-Factory option that jaxsft does not support: quantized (QLoRA) training"
_MULTIMODAL = "key 'image_max_pixels' is a LLaMA-Factory option that jaxsft does not support: multimodal"
_VL_MODEL = "model_type 'qwen3_vl' is not supported; supported: llama, mistral, qwen2, qwen3"
_QUANTIZED_MODEL = "the checkpoint is quantized (quantization_config, quant_method {method}); jaxsft loads unquantized"

# example -> None when it runs, else the start of its one error line (after the file named first, if any).
OUTCOMES = {
    "train_lora/qwen3_lora_sft.yaml": None,
    "train_lora/qwen3_lora_sft_ds3.yaml": None,
    "train_lora/qwen3_preprocess.yaml": None,
    "train_lora/llama3_lora_sft.yaml": None,
    "train_lora/llama3_lora_sft_ds0.yaml": None,
    "train_lora/llama3_lora_predict.yaml": None,
    "train_lora/llama3_preprocess.yaml": None,
    "train_full/qwen3_full_sft.yaml": None,
    "train_full/llama3_full_sft.yaml": None,
    "train_full/llama3_full_predict.yaml": None,
    "merge_lora/qwen3_lora_sft.yaml": None,
    "merge_lora/qwen3_full_sft.yaml": None,
    "merge_lora/llama3_lora_sft.yaml": None,
    "merge_lora/llama3_full_sft.yaml": None,
    "inference/qwen3.yaml": None,
    "inference/qwen3_full_sft.yaml": None,
    "inference/qwen3_lora_sft.yaml": None,
    "extras/nlg_eval/llama3_lora_predict.yaml": None,
    "extras/loraplus/llama3_lora_sft.yaml": None,
    "extras/pissa/llama3_lora_sft.yaml": None,
    "train_lora/qwen3_lora_pretrain.yaml": _PT,
    "train_lora/llama3_lora_pretrain.yaml": _PT,
    "train_lora/qwen3_lora_reward.yaml": "key 'stage': 'rm' is not supported: reward-model training",
    "train_lora/llama3_lora_reward.yaml": "key 'stage': 'rm' is not supported: reward-model training",
    "train_lora/qwen3_lora_dpo.yaml": "key 'stage': 'dpo' is not supported: preference training",
    "train_lora/qwen3vl_lora_dpo.yaml": "key 'stage': 'dpo' is not supported: preference training",
    "train_lora/qwen3_lora_kto.yaml": "key 'stage': 'kto' is not supported: KTO",
    "train_lora/llama3_lora_ppo.yaml": "key 'stage': 'ppo' is not supported: PPO",
    "train_lora/llama3_lora_eval.yaml": "key 'task' is a LLaMA-Factory option that jaxsft does not support: benchmark "
                                        "evaluation",
    "train_lora/qwen3_lora_sft_ray.yaml": "key 'ray_run_name' is a LLaMA-Factory option that jaxsft does not "
                                          "support: Ray is not used",
    "train_lora/qwen3vl_lora_sft.yaml": _MULTIMODAL,
    "train_lora/qwen2vl_lora_sft.yaml": _MULTIMODAL,
    "train_full/qwen3vl_full_sft.yaml": _MULTIMODAL,
    "train_lora/llama4_lora_sft_ds3.yaml": "template: unknown template 'llama4'",
    "train_lora/llava1_5_lora_sft.yaml": "template: unknown template 'llava'",
    "train_qlora/qwen3_lora_sft_otfq.yaml": _QLORA,
    "train_qlora/qwen3_lora_sft_bnb_npu.yaml": _QLORA,
    "extras/fsdp_qlora/llama3_lora_sft.yaml": _QLORA,
    # Their model_name_or_path is a quantized checkpoint: the tiny model stands in with its quantization_config.
    "train_qlora/llama3_lora_sft_awq.yaml": _QUANTIZED_MODEL.format(method="awq"),
    "train_qlora/llama3_lora_sft_gptq.yaml": _QUANTIZED_MODEL.format(method="gptq"),
    "train_qlora/llama3_lora_sft_aqlm.yaml": _QUANTIZED_MODEL.format(method="aqlm"),
    "merge_lora/qwen3_gptq.yaml": "key 'export_quantization_bit' is a LLaMA-Factory option that jaxsft does not "
                                  "support: quantized (GPTQ) export",
    "inference/llama3_vllm.yaml": "key 'infer_backend': 'vllm' is not supported: jaxsft generates with its own",
    "inference/llama3_sglang.yaml": "key 'infer_backend': 'sglang' is not supported: jaxsft generates with its own",
    # Their model is a Qwen3-VL checkpoint: a tiny model stands in with its model_type.
    "merge_lora/qwen3vl_lora_sft.yaml": _VL_MODEL,
    "inference/qwen3vl.yaml": _VL_MODEL,
    "extras/adam_mini/qwen2_full_sft.yaml": "key 'use_adam_mini' is a LLaMA-Factory option that jaxsft does not "
                                            "support: Adam-mini",
    "extras/apollo/llama3_full_sft.yaml": "key 'use_apollo' is a LLaMA-Factory option that jaxsft does not support: "
                                          "APOLLO",
    "extras/badam/llama3_full_sft.yaml": "key 'use_badam' is a LLaMA-Factory option that jaxsft does not support: "
                                         "BAdam",
    "extras/galore/llama3_full_sft.yaml": "key 'use_galore' is a LLaMA-Factory option that jaxsft does not support: "
                                          "GaLore",
    "extras/muon/qwen2_full_sft.yaml": "key 'use_muon' is a LLaMA-Factory option that jaxsft does not support: Muon",
    "extras/dft/qwen2_full_sft.yaml": "key 'use_dft_loss' is a LLaMA-Factory option that jaxsft does not support: "
                                      "the DFT loss",
    "extras/mod/llama3_full_sft.yaml": "key 'mixture_of_depths' is a LLaMA-Factory option that jaxsft does not "
                                       "support: Mixture-of-Depths",
    "extras/oft/llama3_oft_sft.yaml": "key 'finetuning_type': 'oft' is not supported: OFT",
    "extras/llama_pro/llama3_freeze_sft.yaml": "key 'fp16': True is not supported, only False; use bf16: true",
}


def family(example: str) -> str:
    name = Path(example).name
    return "qwen3" if name.startswith("qwen3") else "qwen2" if name.startswith("qwen2") else "llama"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny models of the examples' families, a PEFT adapter for each, and quantized stand-ins."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("models")
    found = {}
    for fam in ("qwen3", "qwen2", "llama"):
        found[fam] = tiny_model(fam, root / fam)
        torch.manual_seed(0)
        base = transformers.AutoModelForCausalLM.from_pretrained(found[fam])
        get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(
            root / f"{fam}-adapter")
        found[f"{fam}-adapter"] = root / f"{fam}-adapter"
    for name, base, change in [(m, "llama", {"quantization_config": {"quant_method": m, "bits": 4}})
                               for m in ("awq", "gptq", "aqlm")] + [("qwen3vl", "qwen3", {"model_type": "qwen3_vl"})]:
        shutil.copytree(found[base], root / name)
        config = json.loads((root / name / "config.json").read_text())
        (root / name / "config.json").write_text(json.dumps({**config, **change}))
        found[name] = root / name
    return found


def machine_specific(example: str, tmp_path: Path, models: dict[str, Path]) -> Path:
    """The example with only paths and CPU sizes changed (the keys a user changes for their machine)."""
    config = yaml.safe_load((FIXTURES / example).read_text())
    stand_in = next((m for m in ("awq", "gptq", "aqlm") if example.endswith(f"_{m}.yaml")), None)
    if Path(example).name.startswith("qwen3vl"):
        stand_in = "qwen3vl"
    config["model_name_or_path"] = str(models[stand_in or family(example)])
    if "adapter_name_or_path" in config:
        config["adapter_name_or_path"] = str(models[f"{family(example)}-adapter"])
    if "dataset" in config or "eval_dataset" in config:
        config["dataset_dir"] = str(DATA_DIR)
    for key in ("output_dir", "export_dir", "tokenized_path"):
        if key in config:
            config[key] = str(tmp_path / key)
    config.update({k: v for k, v in (("max_samples", 8), ("num_train_epochs", 1.0), ("cutoff_len", 64)) if k in config})
    path = tmp_path / Path(example).name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_every_stored_example_is_classified():
    stored = sorted(str(p.relative_to(FIXTURES)) for p in FIXTURES.rglob("*.yaml"))
    assert stored == sorted(OUTCOMES)


def _check_chat_config(path: Path) -> None:
    """What `jaxsft chat` checks before it loads weights (chat has no --dry_run)."""
    from jaxsft.chat import chat_config
    from jaxsft.data.templates import get_template
    from jaxsft.preflight import check_model_dir
    from jaxsft.runtime import load_tokenizer

    cfg = chat_config(str(path), None, [])
    check_model_dir(cfg.model_name_or_path)
    get_template(cfg.template, load_tokenizer(cfg))


@pytest.mark.parametrize("example", sorted(OUTCOMES))
def test_example_dry_run(example, tmp_path, models, capsys):
    path = machine_specific(example, tmp_path, models)
    expected = OUTCOMES[example]
    if example.startswith("inference/"):  # `llamafactory-cli chat` examples
        from jaxsft.errors import UserError, report

        try:
            _check_chat_config(path)
            code = 0
        except UserError as e:
            code = report(e)
    else:
        command = "export" if example.startswith("merge_lora/") else "train"
        code = cli([command, str(path), "--dry_run"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error", "Traceback"))]
    if expected is None:
        assert code == 0 and not err, err
    else:
        assert code == 2 and len(err) == 1, err
        message = re.sub(r"^error: (\S+\.(yaml|json): )?", "", err[0])  # the file that holds the key, if any
        assert message.startswith(expected), err[0]


def test_eval_strategy_evaluates_at_the_end_as_hugging_face_sets_do_eval(tmp_path):
    """HF's TrainingArguments turn do_eval on when eval_strategy is not 'no', so LLaMA-Factory's examples with
    `val_size` + `eval_strategy: steps` write eval_results.json at the end (tested on the loraplus example)."""
    from jaxsft.config_load import load_config

    path = tmp_path / "cfg.yaml"
    path.write_text("dataset: identity\nval_size: 0.1\neval_strategy: steps\neval_steps: 500\n")
    assert load_config(str(path)).do_eval
    assert not load_config(str(path), ["eval_strategy=no"]).do_eval
    assert not load_config(str(path), ["val_size=0"]).do_eval  # no evaluation data: nothing to evaluate


def test_optimizer_names_jaxsft_runs_as_plain_adamw_are_said(tmp_path):
    from jaxsft.config import met_settings
    from jaxsft.config_load import load_config

    path = tmp_path / "cfg.yaml"
    path.write_text("optim: adamw_bnb_8bit\n")
    assert met_settings(load_config(str(path)))["optim"].startswith("'adamw_bnb_8bit' runs as optax AdamW with "
                                                                    "float32 moments")
    assert "optim" not in met_settings(load_config(str(path), ["optim=adamw_torch"]))


def _dry_run_error(capsys, args: list[str]) -> str:
    assert cli(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0].removeprefix("error: ")


def test_data_and_adapters_an_example_cannot_use_are_refused_by_name(tmp_path, models, capsys):
    """dataset_info.json entries of LLaMA-Factory's demo data that hold images (mllm_demo) or KTO labels
    (kto_en_demo) were trained as plain text (the images column ignored, `<image>` learned as text)."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("dataset_info.json", "identity.json"):
        shutil.copyfile(DATA_DIR / name, data / name)
    turns = [{"role": "user", "content": "<image>Who are they?"}, {"role": "assistant", "content": "Players."}]
    (data / "mllm_demo.json").write_text(json.dumps([{"messages": turns, "images": ["mllm_demo_data/1.jpg"]}]))
    (data / "kto_en_demo.json").write_text(json.dumps([{"messages": turns, "label": True}]))
    cfg = machine_specific("train_lora/qwen3_lora_sft.yaml", tmp_path, models)
    registry = data / "dataset_info.json"
    assert _dry_run_error(capsys, ["train", str(cfg), f"dataset_dir={data}", "dataset=identity,mllm_demo",
                                   "--dry_run"]) == (
        f"dataset 'mllm_demo' has images (columns in {registry}); jaxsft trains text-only models: use a text dataset")
    assert _dry_run_error(capsys, ["train", str(cfg), f"dataset_dir={data}", "dataset=kto_en_demo", "--dry_run"]) == (
        f"dataset 'kto_en_demo' is a KTO dataset (columns.kto_tag in {registry}), which LLaMA-Factory's SFT drops; "
        f"jaxsft has no KTO stage: use an SFT dataset")
    missing = tmp_path / "saves" / "lora" / "sft"  # the adapter of an earlier run that is not there
    assert _dry_run_error(capsys, ["train", str(cfg), f"adapter_name_or_path={missing}", "--dry_run"]) == (
        f"adapter_name_or_path: {missing} does not exist; give a PEFT adapter directory (adapter_config.json + "
        f"adapter_model.safetensors), e.g. a LoRA run's output_dir")
    # LLaMA-Factory's Ray example reads dataset_info.json from a hub repo
    assert _dry_run_error(capsys, ["train", str(cfg), "dataset_dir=REMOTE:llamafactory/demo_data", "--dry_run"]) == (
        "dataset_dir: REMOTE:llamafactory/demo_data is LLaMA-Factory's hub form, which jaxsft does not download; fetch "
        "the repo where there is network (`hf download llamafactory/demo_data --repo-type dataset --local-dir DIR`) "
        "and set dataset_dir: DIR")


def test_preprocess_example_tokenizes_saves_and_stops(tmp_path, models, capsys):
    """examples/train_lora/*_preprocess.yaml: LLaMA-Factory saves the tokenized data at tokenized_path and exits
    ("output (not used)"); jaxsft trained a whole run after saving it."""
    cfg = machine_specific("train_lora/qwen3_preprocess.yaml", tmp_path, models)
    assert cli(["train", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "jaxsft: stages: tokenize\n" in out
    assert f"Tokenized dataset is saved at {tmp_path / 'tokenized_path'}; nothing was trained" in out
    assert (tmp_path / "tokenized_path" / "dataset_dict.json").is_file()
    assert not (tmp_path / "output_dir").exists()  # no checkpoint, no adapter
    from datasets import load_from_disk

    saved = load_from_disk(str(tmp_path / "tokenized_path"))
    assert len(saved["train"]) == 16  # identity + alpaca_en_demo, max_samples 8 each
    assert cli(["train", str(cfg), "--dry_run"]) == 0  # the next run trains from it
    assert "jaxsft: stages: train\n" in capsys.readouterr().out


def test_inference_example_chats_with_the_adapter(tmp_path, models, monkeypatch, capsys):
    """examples/inference/qwen3_lora_sft.yaml (infer_backend: huggingface) as `llamafactory-cli chat` takes it."""
    import io

    cfg = machine_specific("inference/qwen3_lora_sft.yaml", tmp_path, models)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nexit\n"))
    assert cli(["chat", str(cfg), "do_sample=false", "max_new_tokens=4"]) == 0
    out = capsys.readouterr().out
    answer = out.split("Assistant: ", 1)[1].split("\n\nUser: ", 1)[0]
    assert answer.strip(), out[-500:]  # the random model said something


def test_warmup_steps_below_one_is_a_fraction_as_transformers_5_reads_it(tmp_path):
    """LLaMA-Factory's galore/mod examples write `warmup_steps: 0.1`; transformers 5 (whose TrainingArguments
    LLaMA-Factory 0.9.4 uses) reads a float in [0, 1) as a fraction of all steps. It was refused as 'expected int'."""
    from jaxsft.config_load import load_config
    from jaxsft.errors import ConfigError
    from jaxsft.optim import warmup_steps

    path = tmp_path / "cfg.yaml"
    path.write_text("warmup_steps: 0.1\n")
    cfg = load_config(str(path))
    assert (cfg.warmup_steps, cfg.warmup_ratio, warmup_steps(cfg, 95)) == (0, 0.1, 10)
    assert warmup_steps(load_config(str(path), ["warmup_steps=5.0"]), 95) == 5
    with pytest.raises(ConfigError, match="key 'warmup_steps' must be a step count, or a fraction in"):
        load_config(str(path), ["warmup_steps=2.5"])
