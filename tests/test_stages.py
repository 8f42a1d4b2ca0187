"""Eval- and predict-only runs as LLaMA-Factory's evaluation YAMLs write them (only `eval_dataset`), for the
base model, a PEFT adapter and a jaxsft checkpoint (`resume_from_checkpoint`), through the CLI; the trained
model handed from train to eval/predict in memory; checkpoints of the earlier layout stay readable."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from jaxsft.main import cli

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "examples" / "tiny-llama")
LEGACY = REPO / "tests" / "fixtures" / "checkpoints" / "legacy_lora" / "checkpoint_2"
EVAL_ONLY = {
    "model_name_or_path": TINY, "eval_dataset": "identity", "dataset_dir": str(REPO / "examples" / "data"),
    "template": "llama3", "cutoff_len": 128, "max_samples": 6, "do_eval": True, "do_predict": True,
    "predict_with_generate": True, "do_sample": False, "max_new_tokens": 4, "per_device_eval_batch_size": 2,
    "finetuning_type": "full", "report_to": "none", "disable_tqdm": True, "mesh.fsdp": 2, "mesh.tensor": 4,
}
LORA = {"finetuning_type": "lora", "lora_rank": 2}


def _cli(values: dict) -> int:
    return cli([f"{k}={v}" for k, v in values.items()])


def _results(out: Path) -> tuple[dict, list[dict]]:
    """eval_results.json without timings, and generated_predictions.jsonl."""
    evals = json.loads((out / "eval_results.json").read_text())
    evals = {k: v for k, v in evals.items() if "runtime" not in k and "per_second" not in k}
    predictions = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    return evals, predictions


def _eval_only_both_ways(tmp_path: Path, name: str, **extra) -> tuple[dict, list[dict]]:
    """The eval/predict-only run with only eval_dataset, and the same with a training dataset named: equal."""
    alone, with_train = tmp_path / f"{name}_alone", tmp_path / f"{name}_with_dataset"
    assert _cli({**EVAL_ONLY, **extra, "output_dir": alone}) == 0
    assert _cli({**EVAL_ONLY, **extra, "dataset": "identity", "output_dir": with_train}) == 0
    got = _results(alone)
    assert got == _results(with_train)
    assert got[0]["eval_examples"] == 6 and len(got[1]) == 6
    return got


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """LoRA trained for 2 steps; eval and predict in the same run get the trained model in memory."""
    out = tmp_path_factory.mktemp("trained") / "out"
    train = {**EVAL_ONLY, **LORA, "do_train": True, "dataset": "identity", "max_steps": 2, "learning_rate": 0.05,
             "per_device_train_batch_size": 1, "save_steps": 2, "logging_steps": 1, "remat_policy": "none"}
    assert _cli({**train, "output_dir": out}) == 0
    return out


def test_eval_and_predict_only_base_adapter_and_checkpoint(tmp_path, trained):
    base = _eval_only_both_ways(tmp_path, "base")

    adapter_dir = tmp_path / "adapter"
    peft_model = __import__("peft").get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32),
        __import__("peft").LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    peft_model.save_pretrained(adapter_dir)
    adapter = _eval_only_both_ways(tmp_path, "adapter", adapter_name_or_path=adapter_dir, **LORA)
    assert adapter[0]["eval_loss"] != base[0]["eval_loss"]  # the adapter is used

    checkpoint = _eval_only_both_ways(tmp_path, "checkpoint", resume_from_checkpoint=trained / "checkpoint_2", **LORA)
    in_memory = _results(trained)  # the training run's own eval and predict, with the params in memory
    assert checkpoint[1] == in_memory[1]
    np.testing.assert_allclose(checkpoint[0]["eval_loss"], in_memory[0]["eval_loss"], rtol=1e-6)
    assert checkpoint[0]["eval_loss"] != base[0]["eval_loss"]


@pytest.mark.parametrize("value, message", [
    ("{out}/checkpoint_7", "error: resume_from_checkpoint: {out}/checkpoint_7 does not exist; checkpoints there: "
                           "none\n"),
    ("true", "error: resume_from_checkpoint: no complete checkpoint in {out}; remove resume_from_checkpoint to use "
             "model_name_or_path (+ adapter_name_or_path) as it is\n"),
    ("{out}/elsewhere", "error: resume_from_checkpoint: no complete checkpoint in {out}/elsewhere; remove "
                        "resume_from_checkpoint to use model_name_or_path (+ adapter_name_or_path) as it is\n"),
])
@pytest.mark.parametrize("stage", ["do_eval", "do_predict"])
def test_eval_and_predict_refuse_a_missing_checkpoint(tmp_path, capsys, value, message, stage):
    out = tmp_path / "out"
    values = {**EVAL_ONLY, "do_eval": stage == "do_eval", "do_predict": stage == "do_predict"}
    assert _cli({**values, "resume_from_checkpoint": value.format(out=out), "output_dir": out}) == 2
    assert capsys.readouterr().err.splitlines()[-1] + "\n" == message.format(out=out)


def test_a_checkpoint_of_other_params_is_a_one_line_error(tmp_path, capsys, trained):
    out = tmp_path / "out"
    assert _cli({**EVAL_ONLY, "finetuning_type": "lora", "lora_rank": 4, "do_predict": False, "output_dir": out,
                 "resume_from_checkpoint": trained / "checkpoint_2"}) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"error: {trained}/checkpoint_2 trained other params than this config builds (")
    assert "shape (" in err and "set the checkpoint's finetuning_type, lora_rank" in err


def test_checkpoints_of_the_earlier_layout_stay_readable(tmp_path):
    """A checkpoint written before params, optimizer and partition were separate items (one `state` item):
    its params are read without an optimizer, for export (read_trained_params) and for eval/predict."""
    import orbax.checkpoint as ocp

    from jaxsft.checkpoint import read_trained_params
    from jaxsft.params import flatten

    saved = ocp.PyTreeCheckpointer().restore(LEGACY / "state")["trainable"]  # orbax alone, as written
    params, run_cfg = read_trained_params(LEGACY)
    flat = flatten(params)
    assert run_cfg.finetuning_type == "lora" and run_cfg.lora_rank == 2
    assert set(saved) <= set(flat) and any("lora_b" in k for k in saved)
    for key, value in saved.items():
        np.testing.assert_array_equal(np.asarray(flat[key]), np.asarray(value), err_msg=key)

    out = tmp_path / "legacy_eval"
    assert _cli({**EVAL_ONLY, **LORA, "do_predict": False, "output_dir": out, "resume_from_checkpoint": LEGACY}) == 0
    base = tmp_path / "base_eval"
    assert _cli({**EVAL_ONLY, **LORA, "do_predict": False, "output_dir": base}) == 0
    # the checkpoint's trained adapters are used: fresh adapters (B = 0) give the base model's loss
    legacy_loss = json.loads((out / "eval_results.json").read_text())["eval_loss"]
    assert legacy_loss != json.loads((base / "eval_results.json").read_text())["eval_loss"]


def _bad_adapter(tmp_path: Path, extra: dict) -> Path:
    """A PEFT adapter of the tiny model with `extra` tensors (PEFT names) added to its weights."""
    import peft
    from safetensors.numpy import load_file, save_file

    out = tmp_path / "bad_adapter"
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32),
                                peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(out)
    weights = out / "adapter_model.safetensors"
    save_file({**load_file(weights), **extra}, str(weights), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("extra, message", [
    ({"base_model.model.model.bogus.weight": np.zeros(4, np.float32)},
     "{w}: tensor 'model.bogus.weight' is neither a LoRA weight nor a weight of this llama model"),
    ({"base_model.model.model.norm.weight": np.zeros(3, np.float32)},
     "{w}: 'model.norm.weight' has shape (3,), expected (64,)"),
])
def test_bad_adapter_tensors_are_one_line_errors(tmp_path, capsys, extra, message):
    adapter = _bad_adapter(tmp_path, extra)
    assert _cli({**EVAL_ONLY, **LORA, "do_predict": False, "adapter_name_or_path": adapter,
                 "output_dir": tmp_path / "out"}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: " + message.format(w=adapter / "adapter_model.safetensors")


def test_streaming_with_a_fractional_val_size_is_a_one_line_error(tmp_path, capsys):
    values = {k: v for k, v in EVAL_ONLY.items() if k not in ("eval_dataset", "max_samples")}
    assert _cli({**values, "dataset": "identity", "val_size": 0.1, "streaming": True, "do_predict": False,
                 "output_dir": tmp_path / "out"}) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: val_size: 0.1 is a fraction; with streaming, val_size must be a number of rows (>= 1).")


# ---------------------------------------------------------------------------------------------------------------
# Stage-alone runs pointed at the wrong kind of directory: one line that says what it is and what to set.

def _checkpoint_like(tmp_path: Path) -> Path:
    """A jaxsft output_dir with one committed step (the files orbax marks a finished checkpoint with)."""
    step = tmp_path / "run" / "checkpoint_3"
    step.mkdir(parents=True)
    (step / "_CHECKPOINT_METADATA").write_text("{}")
    return step


USE_CHECKPOINT = ("eval, predict and chat read it as resume_from_checkpoint: {p} (with the run's finetuning_type); "
                  "`python tools/convert_checkpoint.py --checkpoint {p} --export_dir DIR` exports it")


@pytest.mark.parametrize("key, target, message", [
    ("adapter_name_or_path", "{tmp}/nope",
     "adapter_name_or_path: {tmp}/nope does not exist; give a PEFT adapter directory (adapter_config.json + "
     "adapter_model.safetensors), e.g. a LoRA run's output_dir"),
    ("adapter_name_or_path", "someone/lora-adapter",
     "adapter_name_or_path: someone/lora-adapter does not exist (adapters are read from local directories: download "
     "it first, e.g. `huggingface-cli download someone/lora-adapter --local-dir DIR`); give a PEFT adapter directory "
     "(adapter_config.json + adapter_model.safetensors), e.g. a LoRA run's output_dir"),
    ("adapter_name_or_path", "{checkpoint}",
     "adapter_name_or_path: {checkpoint} is a jaxsft training checkpoint, not a PEFT adapter; "
     + USE_CHECKPOINT.format(p="{checkpoint}")),
    ("adapter_name_or_path", "{run}",
     "adapter_name_or_path: {run} is a jaxsft training checkpoint, not a PEFT adapter; "
     + USE_CHECKPOINT.format(p="{run}")),
    ("adapter_name_or_path", TINY,
     f"adapter_name_or_path: {TINY} holds a full model (config.json), not a LoRA adapter; set model_name_or_path: "
     f"{TINY} and remove adapter_name_or_path"),
    ("model_name_or_path", "{checkpoint}",
     "model_name_or_path: {checkpoint} is a jaxsft training checkpoint, not a Hugging Face model; "
     + USE_CHECKPOINT.format(p="{checkpoint}")),
])
@pytest.mark.parametrize("stage", ["eval", "predict", "export"])
def test_a_path_that_is_not_an_adapter_or_model_says_what_it_is(tmp_path, capsys, key, target, message, stage):
    """eval / predict / export alone (export used to read no model path before loading: 'no config.json in
    ...'; a missing adapter read 'is not a PEFT adapter directory: no adapter_config.json')."""
    checkpoint = _checkpoint_like(tmp_path)
    fill = {"tmp": tmp_path, "checkpoint": checkpoint, "run": checkpoint.parent}
    values = {**EVAL_ONLY, **LORA, "output_dir": tmp_path / "out", "export_dir": tmp_path / "export",
              key: target.format(**fill) if isinstance(target, str) else target}
    assert cli([stage] + [f"{k}={v}" for k, v in values.items()] + ["--dry_run"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: " + message.format(**fill)
    assert not (tmp_path / "export").exists() and not (tmp_path / "out").exists()


def test_an_adapter_given_as_model_or_merged_into_its_own_folder_is_refused(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    peft_model = __import__("peft").get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32),
        __import__("peft").LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(adapter)
    assert cli(["export", f"model_name_or_path={adapter}", "template=llama3", f"export_dir={tmp_path / 'e'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: model_name_or_path: {adapter} holds a LoRA adapter, not a model; set adapter_name_or_path: "
        f"{adapter} and model_name_or_path to its base model")
    assert cli(["export", f"model_name_or_path={TINY}", f"adapter_name_or_path={adapter}", "template=llama3",
                f"export_dir={adapter}", "overwrite_output_dir=true"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: export_dir: {adapter} is the directory of adapter_name_or_path; the merged model would replace the "
        f"adapter: choose another export_dir")
    assert sorted(p.name for p in adapter.iterdir()) == ["README.md", "adapter_config.json",
                                                          "adapter_model.safetensors"]


def test_the_run_summary_of_a_stage_alone_names_what_it_reads(tmp_path, capsys):
    """An eval-only run said `data: None` and printed the optimizer and the config's LoRA rank (not the
    adapter's); an export printed the data, mesh and output_dir it never uses."""
    values = {**EVAL_ONLY, **LORA, "adapter_name_or_path": TINY, "output_dir": tmp_path / "out"}
    cli(["eval"] + [f"{k}={v}" for k, v in values.items()] + ["--dry_run"])
    said = capsys.readouterr().out.splitlines()
    assert said[:3] == ["jaxsft: stages: eval", f"  model: {TINY}  template: llama3  finetuning: lora",
                        f"  adapter: {TINY}"]
    assert said[3].startswith(f"  data: eval: identity (dir {REPO / 'examples' / 'data'})")
    assert not any(line.startswith("  optim:") for line in said)
    values = {**values, "do_train": True, "dataset": "identity", "eval_dataset": "null", "do_eval": False,
              "do_predict": False}
    cli(["train"] + [f"{k}={v}" for k, v in values.items()] + ["--dry_run"])  # training on: the adapter's rank
    said = capsys.readouterr().out.splitlines()
    assert said[1:3] == [f"  model: {TINY}  template: llama3  finetuning: lora", f"  adapter: {TINY}"]
    assert said[3].startswith("  data: identity (dir ") and said[4].startswith("  optim: ")
    cli(["export", f"model_name_or_path={TINY}", "template=llama3", f"export_dir={tmp_path / 'e'}", "--dry_run"])
    said = capsys.readouterr().out.splitlines()
    assert said[:3] == ["jaxsft: stages: export", f"  model: {TINY}  template: llama3  finetuning: lora",
                        f"  export_dir: {tmp_path / 'e'} (merged model, float32)"]


def test_inspect_of_a_config_without_data_is_a_one_line_error(tmp_path, capsys):
    assert cli(["inspect", f"model_name_or_path={TINY}", "template=llama3", f"export_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: inspect: the config names no data to inspect; set dataset and/or eval_dataset (or tokenized_path)")


def test_eval_of_a_tokenized_path_without_an_eval_split_says_so(tmp_path, capsys):
    """tokenized_path replaces the datasets; one saved by a training run without evaluation data has no eval
    split (it read 'every row of the evaluation data was dropped; see the warning above', with no such warning)."""
    from jaxsft.config_load import build_config
    from jaxsft.data.args import DataArgs
    from jaxsft.data.pipeline import build_datasets
    from jaxsft.runtime import load_tokenizer

    tokenized = tmp_path / "tokenized"
    cfg = build_config({**EVAL_ONLY, "eval_dataset": None, "do_eval": False, "do_predict": False,
                        "dataset": "identity", "tokenized_path": str(tokenized), "output_dir": str(tmp_path / "train")})
    build_datasets(DataArgs.from_config(cfg), load_tokenizer(cfg), train=True)
    assert (tokenized / "dataset_dict.json").is_file()
    assert _cli({**EVAL_ONLY, "do_predict": False, "tokenized_path": tokenized, "output_dir": tmp_path / "out"}) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: do_eval: tokenized_path {tokenized} holds no eval split (it was saved by a run without eval_dataset "
        f"or val_size), and it replaces the datasets; remove tokenized_path to evaluate eval_dataset")


def _chat(values: dict, monkeypatch, capsys) -> tuple[int, str]:
    """`jaxsft chat` answering 'hi', then Ctrl-C at the prompt: (exit status, the answer)."""
    typed = iter(["hi"])

    def user(prompt=""):
        print(prompt, end="")
        try:
            return next(typed)
        except StopIteration:
            raise KeyboardInterrupt from None

    monkeypatch.setattr("builtins.input", user)
    status = cli(["chat"] + [f"{k}={v}" for k, v in values.items()])
    out = capsys.readouterr().out
    return status, out.split("Assistant: ", 1)[1].split("\n", 1)[0]


def test_chat_reads_resume_from_checkpoint_and_leaves_on_ctrl_c(tmp_path, monkeypatch, capsys, trained):
    """The eval/predict config's resume_from_checkpoint is the model chat talks with (chat ignored it and talked
    with the base model); Ctrl-C leaves with status 130 and no traceback (it was a KeyboardInterrupt traceback)."""
    values = {**EVAL_ONLY, **LORA, "output_dir": tmp_path / "out"}
    status, answer = _chat({**values, "resume_from_checkpoint": trained / "checkpoint_2"}, monkeypatch, capsys)
    first = json.loads((trained / "generated_predictions.jsonl").read_text().splitlines()[0])
    assert status == 130
    assert first["prompt"].endswith("user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert answer == first["predict"]  # the training run's own prediction, params in memory
    status, base_answer = _chat(values, monkeypatch, capsys)
    assert status == 130 and base_answer != answer


def test_export_adapter_alone_without_an_adapter_is_a_one_line_error(tmp_path, capsys):
    """It read 'the params hold no LoRA adapters (finetuning_type: lora)' with finetuning_type: lora set."""
    assert cli(["export", f"model_name_or_path={TINY}", "template=llama3", "finetuning_type=lora",
                "export_adapter=true", f"export_dir={tmp_path / 'e'}", "--dry_run"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: export_adapter: true writes the LoRA adapter, and an export alone has one only from "
        "adapter_name_or_path, which is not set; set it, or export_adapter: false to write the model")


def test_an_adapter_on_the_vision_tower_is_refused_by_name(tmp_path, capsys):
    """PEFT's target_modules match module names in both towers of a multimodal model; jaxsft merges the language
    model's adapters only, and said the vision tower's tensor was 'neither a LoRA weight nor a weight of this
    gemma3 model'."""
    import shutil

    import peft
    from tiny_models import save_tiny_model

    model, path = save_tiny_model("gemma3", tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(TINY) / name, path / name)
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    assert cli(["export", f"model_name_or_path={path}", f"adapter_name_or_path={tmp_path / 'adapter'}",
                "template=llama3", f"export_dir={tmp_path / 'export'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'adapter' / 'adapter_model.safetensors'}: tensor 'base_model.model.model.vision_tower."
        f"encoder.layers.0.self_attn.q_proj.lora_A.weight' adapts the model's vision tower or projector, which jaxsft "
        f"carries through unchanged (it trains and merges the language model only); use an adapter of the language "
        f"model alone (as LLaMA-Factory trains them), or merge this one with PEFT")
    assert not (tmp_path / "export" / "config.json").exists()


def test_reading_a_checkpoint_logs_no_missing_metadata_warning(trained, caplog):
    """Every checkpoint read (eval, predict, chat, convert_checkpoint, resume) printed 'WARNING:absl:Metadata file
    does not exist: .../trainable/_CHECKPOINT_METADATA', as if the checkpoint were damaged."""
    from jaxsft.checkpoint import holds_optimizer_state, read_trained_params

    caplog.set_level("WARNING")
    params, cfg = read_trained_params(trained / "checkpoint_2")
    assert cfg.finetuning_type == "lora" and holds_optimizer_state(trained, 2)
    assert not [r for r in caplog.records if "Metadata file does not exist" in r.getMessage()]


def test_predict_past_the_models_positions_is_a_one_line_error(tmp_path, capsys):
    """It was generate()'s ValueError traceback, after the data and the model had loaded."""
    assert _cli({**EVAL_ONLY, "do_eval": False, "max_new_tokens": 5000, "output_dir": tmp_path / "out"}) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: max_new_tokens: 5000 new tokens after the longest prompt (31 tokens) pass the model's "
        "max_position_embeddings (4096); lower max_new_tokens, or cutoff_len (which bounds the prompts)")
    assert not (tmp_path / "out" / "generated_predictions.jsonl").exists()
