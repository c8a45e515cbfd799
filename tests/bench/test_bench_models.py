"""Smoke test of bench/models.py: a --quick run writes a consistent JSON report."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "models.py"


def _load():
  spec = importlib.util.spec_from_file_location("bench_models", BENCH)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def bench():
  return _load()


def test_quick_run_writes_consistent_json(bench, tmp_path):
  out = tmp_path / "nested" / "models.json"  # the parent directory does not exist yet
  res = bench.main(["--quick", "--steps", "1", "--out", str(out)])
  data = json.loads(out.read_text())
  assert data == json.loads(json.dumps(res))

  assert data["quick"] and data["model"]["num_layers"] == 2 and data["seq"] == 128
  assert data["batch"] == 1 and data["dtype"] == "float32"
  assert data["platform"] and data["device_kind"] and data["jax_version"]
  assert data["model"]["params"] > data["model"]["matmul_params"] > 0

  fpt = data["flops_per_token"]
  assert fpt["train"] == 3 * fpt["forward"] > 0
  tokens = data["batch"] * data["seq"]
  peak = data["matmul"]["flop_per_s"]
  assert peak > 0 and data["matmul"]["flops_per_call"] == 2 * data["matmul"]["size"] ** 3
  for name in ("forward", "train"):
    r = data[name]
    assert r["tokens_per_s"] > 0 and r["compile_s"] >= 0
    assert r["tokens_per_step"] == tokens
    assert math.isclose(r["tokens_per_s"], tokens / r["step_s_median"], rel_tol=1e-9)
    assert r["flops_per_token"] == fpt[name]
    assert math.isclose(r["flop_per_s"], r["flops_per_token"] * r["tokens_per_s"], rel_tol=1e-9)
    assert math.isclose(r["mfu_vs_matmul_peak"], r["flop_per_s"] / peak, rel_tol=1e-9)
    assert 0 < r["mfu_vs_matmul_peak"] <= 1.5
    if r["xla_flops_per_token"] is not None:  # the analytic count agrees with XLA's within 5%
      assert math.isclose(r["xla_flops_per_token"], r["flops_per_token"], rel_tol=0.05)


def test_analytic_flops_gpt2_small(bench):
  from cot2align_jax.models import config_from_hf

  cfg = config_from_hf(bench.GPT2_SMALL)
  # 12 layers * (4*768^2 + 2*768*3072) + 768*50257 (tied LM head)
  assert bench.matmul_params(cfg) == 12 * (4 * 768**2 + 2 * 768 * 3072) + 768 * 50257
  assert bench.flops_per_token(cfg, 512)["forward"] == (
      2 * bench.matmul_params(cfg) + 12 * 4 * 512 * 768)


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--seq", "1"], ["--dtype", "float16"],
                                  ["--steps", "x"]])
def test_bad_args_raise_one_line_error(bench, argv):
  with pytest.raises(bench.BenchError) as err:
    bench.parse_args(argv)
  assert "\n" not in str(err.value)
