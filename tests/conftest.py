"""Test-wide setup: CPU only, 8 simulated devices so mesh/sharding logic runs without accelerators."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _reset_jaxsft_logging():
    """The CLI gives the 'jaxsft' logger its own stderr handler (no propagation); undo that after a test
    so later tests' caplog sees jaxsft's records again."""
    yield
    logger = logging.getLogger("jaxsft")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True
