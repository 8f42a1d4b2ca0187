"""LLaMA-Factory's own example YAMLs (../shared/llamafactory-examples) run through the CLI with only what is
specific to this machine changed (model path, dataset_dir, output_dir, CPU-sized max_samples / epochs /
cutoff_len), and leave the files LLaMA-Factory leaves."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from run_logs import log_lines
from tiny_models import build_tiny_model

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO.parent / "shared" / "llamafactory-examples"
DATA_DIR = REPO.parent / "shared" / "data" / "llamafactory"
TOKENIZER = Path(__file__).parent / "fixtures" / "data" / "tokenizer"
FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory_examples"  # LF's examples/ (README there)


def tiny_model(family: str, directory: Path) -> Path:
    """A tiny random model of `family` with a tokenizer that has the chat templates' special tokens."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    model = build_tiny_model(family, vocab_size=len(tokenizer), max_position_embeddings=4096,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(directory, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER / name, directory / name)
    return directory


def machine_specific(example: str, tmp_path: Path, **values) -> Path:
    """The example YAML with only the given keys replaced, written to tmp_path."""
    text = (EXAMPLES / example).read_text()
    config = yaml.safe_load(text)
    unknown = set(values) - {"model_name_or_path", "adapter_name_or_path", "dataset_dir", "output_dir",
                             "max_samples", "num_train_epochs", "cutoff_len"}
    assert not unknown, unknown
    config.update(values)
    path = tmp_path / example
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def jaxsft(*args, cwd=None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "jaxsft.main", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_qwen3_lora_sft_example_trains_and_writes_an_adapter(tmp_path):
    model = tiny_model("qwen3", tmp_path / "qwen3")
    out = tmp_path / "saves" / "lora"
    cfg = machine_specific("train_lora-qwen3_lora_sft.yaml", tmp_path, model_name_or_path=str(model),
                           dataset_dir=str(DATA_DIR), output_dir=str(out), max_samples=32, num_train_epochs=2.0,
                           cutoff_len=128)
    done = jaxsft("train", cfg)
    assert "note: 'save_only_model'" not in done.stdout  # false: the default, nothing to say
    assert "note: 'trust_remote_code'" in done.stdout
    # What LLaMA-Factory's output_dir holds after a LoRA run (HF Trainer.save_model + LF's callbacks).
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "trainer_log.jsonl",
                 "train_results.json", "all_results.json", "training_loss.png"):
        assert (out / name).is_file(), name
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["lora_alpha"] == 16
    assert sorted(adapter["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # lora_target: all
    logged = [r for r in log_lines(out) if "loss" in r]  # 64 examples / (8 rows x 8 accumulation) x 2 epochs
    assert [r["current_steps"] for r in logged] == [2] == [r["total_steps"] for r in logged]
    assert json.loads((out / "train_results.json").read_text())["epoch"] == 2.0
    # The adapter loads in peft on the base model.
    base = transformers.AutoModelForCausalLM.from_pretrained(model)
    peft_model = PeftModel.from_pretrained(base, out)
    assert any(float(p.abs().sum()) > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)


def test_qwen3_full_sft_example_with_deepspeed_writes_a_model(tmp_path):
    model = tiny_model("qwen3", tmp_path / "qwen3")
    out = tmp_path / "saves" / "full"
    cfg = machine_specific("train_full-qwen3_full_sft.yaml", tmp_path, model_name_or_path=str(model),
                           dataset_dir=str(DATA_DIR), output_dir=str(out), max_samples=16, num_train_epochs=1.0,
                           cutoff_len=128)
    done = jaxsft("train", cfg)
    # examples/deepspeed/ds_z3_config.json does not exist here: the stage comes from its name.
    assert "note: 'deepspeed': ZeRO-3 -> mesh {fsdp: -1}" in done.stdout
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_log.jsonl", "train_results.json",
                 "training_loss.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # bf16: true
    trained = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    original = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    changed = [n for n, p in trained.named_parameters()
               if not torch.equal(p, original.get_parameter(n).to(torch.bfloat16).float())]
    assert "model.layers.1.mlp.down_proj.weight" in changed  # full: every kind of weight trained


def test_llama3_lora_predict_example_generates(tmp_path):
    model = tiny_model("llama", tmp_path / "llama")
    base = transformers.AutoModelForCausalLM.from_pretrained(model)
    adapter_dir = tmp_path / "saves" / "sft"
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(adapter_dir)
    out = tmp_path / "saves" / "predict"
    cfg = machine_specific("nlg_eval-llama3_lora_predict.yaml", tmp_path, model_name_or_path=str(model),
                           adapter_name_or_path=str(adapter_dir), dataset_dir=str(DATA_DIR),
                           output_dir=str(out), max_samples=1, cutoff_len=128)
    jaxsft("train", cfg)  # LLaMA-Factory runs this example with `llamafactory-cli train`
    predictions = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2  # identity + alpaca_en_demo, 1 each
    assert all(set(p) >= {"prompt", "predict", "label"} for p in predictions)
    results = json.loads((out / "predict_results.json").read_text())
    for key in ("predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l"):
        assert key in results and np.isfinite(results[key]), key


def test_merge_lora_example_exports_a_merged_model(tmp_path):
    """LLaMA-Factory's merge_lora/qwen3_lora_sft.yaml: no do_*, adapter + export_dir, as
    `llamafactory-cli export` takes it."""
    model = tiny_model("qwen3", tmp_path / "qwen3")
    base = transformers.AutoModelForCausalLM.from_pretrained(model)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 17, 300, 42, 7, 1999]])
    with torch.no_grad():
        expected = peft_model(ids).logits
    config = {  # examples/merge_lora/qwen3_lora_sft.yaml, paths changed
        "model_name_or_path": str(model), "adapter_name_or_path": str(tmp_path / "adapter"),
        "template": "qwen3_nothink", "trust_remote_code": True,
        "export_dir": str(tmp_path / "merged"), "export_size": 5, "export_device": "cpu",
        "export_legacy_format": False,
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    done = jaxsft("export", tmp_path / "merge.yaml")
    assert "note: 'export_device' has no effect" in done.stdout
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        got = merged(ids).logits
    assert float((got - expected).abs().max()) < 1e-4
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


# LLaMA-Factory's examples/extras/{pissa,loraplus}/llama3_lora_sft.yaml, as its repository ships them.
LF_LORA_VARIANT = """
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
{method}

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
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
"""


def _jaxsft_logits(out: Path, ids: np.ndarray) -> np.ndarray:
    """Logits of the run's last checkpoint in fp32 (adapters unmerged)."""
    from jaxsft.checkpoint import read_trained_params, trained_lora_scale
    from jaxsft.model.hf import load_hf_config
    from jaxsft.model.transformer import forward

    params, cfg = read_trained_params(out)
    pos = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    return np.asarray(forward(params, load_hf_config(cfg.model_name_or_path), ids, pos, np.ones_like(ids),
                              lora_scale=trained_lora_scale(cfg)))


def _peft_logits(base_dir: Path, adapter_dir: Path, ids: np.ndarray) -> np.ndarray:
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                             attn_implementation="eager")
    with torch.no_grad():
        return PeftModel.from_pretrained(base, adapter_dir).eval()(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def run_variant(tmp_path, method: str, text: str | None = None, max_samples: int = 32) -> tuple[Path, Path]:
    model = tiny_model("llama", tmp_path / "llama")
    (tmp_path / "lf.yaml").write_text(text or LF_LORA_VARIANT.format(method=method))
    out = tmp_path / "saves" / "sft"
    cfg = machine_specific("lf.yaml", tmp_path, model_name_or_path=str(model), dataset_dir=str(DATA_DIR),
                           output_dir=str(out), max_samples=max_samples, num_train_epochs=2.0, cutoff_len=128)
    jaxsft("train", cfg)
    return model, out


IDS = np.array([[5, 17, 300, 42, 7, 1999, 64, 3]], np.int32)


def test_pissa_example_converts_and_the_converted_adapter_matches_in_peft(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "EXAMPLES", tmp_path)
    model, out = run_variant(tmp_path, "pissa_init: true\npissa_iter: 16\npissa_convert: true")
    # LLaMA-Factory's PissaConvertCallback layout: the initial adapter, the trained one, the converted one.
    start = json.loads((out / "pissa_init" / "adapter_config.json").read_text())
    trained = json.loads((out / "adapter_config.json").read_text())
    converted = json.loads((out / "pissa_converted" / "adapter_config.json").read_text())
    assert (start["r"], start["init_lora_weights"]) == (8, True)
    assert (trained["r"], trained["init_lora_weights"]) == (8, "pissa_niter_16")
    assert (converted["r"], converted["lora_alpha"], converted["init_lora_weights"]) == (16, 32, True)
    # The converted adapter applies to the original model: PEFT gives jaxsft's trained logits.
    expected = _jaxsft_logits(out, IDS)
    got = _peft_logits(model, out / "pissa_converted", IDS)
    assert np.abs(got - expected).max() < 1e-4
    base = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        untrained = base(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    assert np.abs(untrained - expected).max() > 1e-3  # training moved it


def test_loraplus_example_trains_and_its_adapter_matches_in_peft(tmp_path, monkeypatch):
    """examples/extras/loraplus/llama3_lora_sft.yaml as stored, with its eval section (val_size 0.1,
    eval_strategy: steps): Hugging Face turns do_eval on for it, so LLaMA-Factory leaves eval_results.json."""
    monkeypatch.setattr(sys.modules[__name__], "EXAMPLES", tmp_path)
    text = (FIXTURES / "extras" / "loraplus" / "llama3_lora_sft.yaml").read_text()
    assert "loraplus_lr_ratio: 16.0" in text and "eval_strategy: steps" in text
    model, out = run_variant(tmp_path, "", text, max_samples=40)  # 72 train rows: one step of 8 x 8 per epoch
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_examples"] == 8 and np.isfinite(results["eval_loss"])  # 10% of 80 rows
    expected = _jaxsft_logits(out, IDS)
    got = _peft_logits(model, out, IDS)
    assert np.abs(got - expected).max() < 1e-4


# LLaMA-Factory's examples/extras/llama_pro/llama3_freeze_sft.yaml (after expand.sh), as it ships it.
LF_LLAMA_PRO = LF_LORA_VARIANT.replace("finetuning_type: lora\nlora_rank: 8\nlora_target: all\n{method}",
                                       "finetuning_type: freeze\nfreeze_trainable_layers: 8\n"
                                       "freeze_trainable_modules: all\nuse_llama_pro: true")


def test_llama_pro_example_expands_and_trains_only_the_new_blocks(tmp_path, monkeypatch, capsys):
    from safetensors.numpy import load_file

    sys.path.insert(0, str(REPO / "tools"))
    import llama_pro

    monkeypatch.setattr(sys.modules[__name__], "EXAMPLES", tmp_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    original = build_tiny_model("llama", num_layers=8, vocab_size=len(tokenizer), max_position_embeddings=4096,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    original.save_pretrained(tmp_path / "llama3-8b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER / name, tmp_path / "llama3-8b" / name)
    missing = tmp_path / "no-such-model"  # a path typo: one line, exit 2 (it was a traceback)
    capsys.readouterr()
    assert llama_pro.main(["--model_name_or_path", str(missing), "--num_expand", "8", "--output_dir",
                           str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == (f"error: {missing} is not a local directory and HF_HUB_OFFLINE is set, so it "
                                       f"cannot be downloaded; pass a local checkpoint directory or unset "
                                       f"HF_HUB_OFFLINE\n")
    # expand.sh: python scripts/llama_pro.py --model_name_or_path ... --output_dir models/llama3-8b-pro --num_expand 8
    assert llama_pro.main(["--model_name_or_path", str(tmp_path / "llama3-8b"), "--num_expand", "8",
                           "--output_dir", str(tmp_path / "llama3-8b-pro")]) == 0
    pro = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama3-8b-pro", dtype=torch.float32)
    assert pro.config.num_hidden_layers == 16
    with torch.no_grad():
        ids = torch.tensor(IDS, dtype=torch.long)
        assert float((pro(ids).logits - original(ids).logits).abs().max()) < 1e-4  # expansion changes nothing

    (tmp_path / "lf.yaml").write_text(LF_LLAMA_PRO)
    out = tmp_path / "saves" / "freeze"
    cfg = machine_specific("lf.yaml", tmp_path, model_name_or_path=str(tmp_path / "llama3-8b-pro"),
                           dataset_dir=str(DATA_DIR), output_dir=str(out), max_samples=32, num_train_epochs=2.0,
                           cutoff_len=128)
    jaxsft("train", cfg)
    before = load_file(tmp_path / "llama3-8b-pro" / "model.safetensors")
    after = load_file(out / "model.safetensors")  # bf16: true exports bfloat16, compared in bfloat16
    trained = {int(k.split(".")[2]) for k in before if k.startswith("model.layers.")
               and not np.array_equal(after[k], before[k].astype(after[k].dtype))}
    assert trained == {1, 3, 5, 7, 9, 11, 13, 15}  # the inserted blocks, and only they
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        np.testing.assert_array_equal(after[k], before[k].astype(after[k].dtype))
