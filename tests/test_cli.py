"""The `jaxsft` command: subcommands as llamafactory-cli reads them, version and env for bug reports."""

from pathlib import Path

from jaxsft.main import cli

REPO = Path(__file__).resolve().parents[1]


def test_version_env_and_help(capsys):
    assert cli(["version"]) == 0
    assert capsys.readouterr().out.startswith("jaxsft ")
    assert cli(["env"]) == 0
    out = capsys.readouterr().out
    for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "transformers"):
        assert f"- {package}: " in out and f"- {package}: not installed" not in out, package
    assert "- JAX backend: cpu" in out and "- Devices: 8 x cpu" in out
    assert cli([]) == 0 and "jaxsft {train,eval,predict,export,chat,inspect}" in capsys.readouterr().out


def test_inspect_prints_encoded_examples_and_counts(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(f"model_name_or_path: {REPO / 'examples' / 'tiny-llama'}\ntemplate: llama3\n"
                      f"dataset: identity\ndataset_dir: {REPO / 'examples' / 'data'}\ncutoff_len: 64\n")
    assert cli(["inspect", str(config), "max_samples=3", "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "== first example" in out and "<|start_header_id|>assistant<|end_header_id|>\n\n[[" in out
    assert "== train\n  rows read: 3\n" in out and (tmp_path / "report" / "data_report.html").exists()


def test_subcommand_runs_only_its_stage(tmp_path, capsys):
    """`jaxsft export` of a training config runs the export stage alone (here: refused, no adapter to merge
    and no export_dir), never the training the YAML also asks for."""
    config = tmp_path / "cfg.yaml"
    config.write_text(f"model_name_or_path: {REPO / 'examples' / 'tiny-llama'}\ntemplate: llama3\n"
                      f"dataset: identity\ndataset_dir: {REPO / 'examples' / 'data'}\ndo_train: true\n"
                      f"output_dir: {tmp_path / 'out'}\n")
    assert cli(["export", str(config), "--dry_run"]) == 0
    assert capsys.readouterr().out.startswith("jaxsft: stages: export\n")
    assert cli(["train", str(config), "--dry_run"]) == 0
    assert capsys.readouterr().out.startswith("jaxsft: stages: train\n")
    assert cli(["export", str(config)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: export needs export_dir"
    assert not (tmp_path / "out").exists()
