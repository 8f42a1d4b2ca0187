"""Shared fixtures for the data tests: the real LLaMA-Factory demo data and the committed test tokenizer."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = (REPO / ".." / "shared" / "data" / "llamafactory").resolve()
FIXTURES = REPO / "tests" / "fixtures" / "data"
TOKENIZER_DIR = FIXTURES / "tokenizer"


def load_tokenizer():
    """A fresh tokenizer: templates change EOS/pad in place, so every use gets its own copy."""
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture
def tokenizer():
    return load_tokenizer()


@pytest.fixture
def new_tokenizer():
    """A factory of fresh tokenizers, for tests that need several."""
    return load_tokenizer


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "dataset_info.json").exists():
        pytest.fail(f"demo data missing: {DATA_DIR} (CI puts shared/ beside the clone)")
    return DATA_DIR
