"""Multi-host preprocessing: each process tokenizes its share of the rows, then every process has all of them.

Process p of P encodes the p-th contiguous block of the rows (so the blocks, put back in process order, are
the rows in order) and the blocks are exchanged with JAX's multi-process all-gather, in pieces of `PIECE`
bytes, so no process waits for another to tokenize everything (no rank-0-first barrier) and each does
1/P of the work. A block that raised (a malformed row) is raised on every process, the first in row order.
"""

from __future__ import annotations

import pickle
from typing import Any, Callable

import numpy as np

PIECE = 64 << 20  # bytes per all-gather


def block(n: int, index: int, count: int) -> tuple[int, int]:
    """[start, end) of process `index`'s share of `n` rows."""
    size = -(-n // count)
    return min(index * size, n), min((index + 1) * size, n)


def allgather_bytes(payload: bytes) -> list[bytes]:
    """Every process's `payload`, in process order."""
    from jax.experimental import multihost_utils

    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(payload)], np.int64))).reshape(-1)
    mine = np.frombuffer(payload, np.uint8)
    parts = [bytearray() for _ in sizes]
    top = int(sizes.max())
    for start in range(0, top, PIECE):
        piece = np.zeros(min(PIECE, top - start), np.uint8)
        chunk = mine[start:start + len(piece)]
        piece[:len(chunk)] = chunk
        gathered = np.asarray(multihost_utils.process_allgather(piece)).reshape(len(sizes), -1)
        for part, row in zip(parts, gathered):
            part += row.tobytes()
    return [bytes(part[:size]) for part, size in zip(parts, sizes)]


def all_agree(flag: bool) -> bool:
    """Whether `flag` holds on every process (a collective: every process calls it)."""
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.array([int(flag)], np.int32))).all())


def run_split(work: Callable[[int, int], Any], n: int, index: int, count: int) -> list[Any]:
    """[work(start, end) of every process's block], in process order, each computed by its own process."""
    start, end = block(n, index, count)
    try:
        result = (True, work(start, end))
    except Exception as e:  # noqa: BLE001 - every process raises it, after the exchange
        result = (False, e)
    try:
        payload = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - an error that cannot cross: its text does
        payload = pickle.dumps((False, RuntimeError(f"{type(result[1]).__name__}: {result[1]}")))
    values = []
    for ok, value in map(pickle.loads, allgather_bytes(payload)):
        if not ok:
            raise value
        values.append(value)
    return values
