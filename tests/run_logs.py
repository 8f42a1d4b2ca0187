"""Reading a run's trainer_log.jsonl in tests."""

import json
from pathlib import Path


def log_lines(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "trainer_log.jsonl").read_text().splitlines()]


def train_losses(out_dir_or_lines) -> dict[int, float]:
    """step -> logged training loss, from an output_dir or from already-read log lines."""
    lines = out_dir_or_lines if isinstance(out_dir_or_lines, list) else log_lines(out_dir_or_lines)
    return {r["step"]: r["loss"] for r in lines if "loss" in r and "step" in r}
