"""Mistral-7B → TinyLlama-1.1B (different vocabularies): CoT2Align over DSKD-CMA (forward KL),
kd_rate 0.9, or over ULD / MinED with kd_rate 0.5; LoRA r 256, α 8 on the student; lr 1e-3,
batch 32, 10 epochs.

    python -m cot2align_jax.train --config=configs/paper/mistral_to_tinyllama.py:mined ...

arg: `[base=]<base KD>`: dskd_cma (default), uld or mined. LoRA on the student (student.lora;
merged into the weights on export); --config.student.lora.enabled=False trains it fully.
"""

from cot2align_jax.training.config import load_sibling


def get_config(arg=None):
  common = load_sibling(__file__, "_common.py")
  base, rate = common.pick_base(arg, "dskd_cma", {"dskd_cma": 0.9, "uld": 0.5, "mined": 0.5})
  return common.paper_config(
      __file__, teacher="mistralai/Mistral-7B-v0.1",
      student="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", base=base, kd_rate=rate,
      divergence="fkl", lr=1e-3, epochs=10, lora=True)
