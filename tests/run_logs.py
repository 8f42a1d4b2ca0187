"""Reading a run's trainer_log.jsonl in tests."""

import json
from pathlib import Path


def log_lines(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "trainer_log.jsonl").read_text().splitlines()]


def train_losses(out_dir_or_lines) -> dict[int, float]:
    """step -> logged training loss, from an output_dir or from already-read log lines."""
    lines = out_dir_or_lines if isinstance(out_dir_or_lines, list) else log_lines(out_dir_or_lines)
    return {r["step"]: r["loss"] for r in lines if "loss" in r and "step" in r}


def wandb_history(run_file) -> list[dict]:
    """The `history` records of a W&B run's transaction log (`run-<id>.wandb`, W&B's LevelDB-style log:
    a 7-byte header, then 32 KiB blocks of records `crc32 (4) | length (2, LE) | type (1) | data`, where a
    record split over blocks comes as FIRST, MIDDLE..., LAST), decoded with W&B's own protobuf schema."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B", run_file
    block, at, pending, records = 32768, 7, b"", []
    while at + 7 <= len(data):
        if block - at % block < 7:  # a block's tail too short for a header is padding
            at += block - at % block
            continue
        _, length, kind = struct.unpack("<IHB", data[at:at + 7])
        chunk, at = data[at + 7:at + 7 + length], at + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                records.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
    return records
