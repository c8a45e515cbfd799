"""Llama2-7B → TinyLlama-1.1B (same vocabulary): CoT2Align over plain KD (forward KL),
kd_rate 0.6 (the paper's range is 0.55–0.6); LoRA on the student; lr 1e-3, batch 32, 10 epochs.

    python -m cot2align_jax.train --config=configs/paper/llama2_to_tinyllama.py ... \
        [--config.kd.kd_rate=0.55]

LoRA r=256, α=8 on the student (student.lora; merged into the weights on export).
"""

from cot2align_jax.training.config import load_sibling


def get_config(arg=None):
  common = load_sibling(__file__, "_common.py")
  base, rate = common.pick_base(arg, "kd", {"kd": 0.6})
  return common.paper_config(
      __file__, teacher="meta-llama/Llama-2-7b-hf",
      student="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", base=base, kd_rate=rate,
      divergence="fkl", lr=1e-3, epochs=10, lora=True)
