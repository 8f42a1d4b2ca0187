"""Files a kill must never leave half-written: each is written under a hidden name beside its final path and
renamed into place (`os.replace` is atomic), so a reader finds the old file or the new one, never a part."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def written_atomically(path: str | os.PathLike):
    """Yields a hidden path beside `path` to write; renames it to `path` once the writing returned."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    with written_atomically(path) as partial:
        partial.write_text(text, encoding="utf-8")
