"""Test setup: offline Hub, 8 fake CPU devices, and access to ../shared."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

from cot2align_jax.core.paths import shared_dir  # noqa: E402


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: heavy real-model test (runs in CI when time allows)")


@pytest.fixture(scope="session")
def shared():
  """Path of ../shared; skips (or fails under COT2ALIGN_REQUIRE_SHARED=1) when it is absent."""
  path = shared_dir()
  if path is None:
    if os.environ.get("COT2ALIGN_REQUIRE_SHARED") == "1":
      pytest.fail("COT2ALIGN_REQUIRE_SHARED=1 but the shared directory was not found")
    pytest.skip("../shared (data, tokenizers) not found; set COT2ALIGN_SHARED to run this test")
  return path
