"""GPT2-XL 1.5B → GPT2-120M (same vocabulary): CoT2Align over plain KD (forward KL),
kd_rate 0.7; full fine-tuning, lr 5e-4, batch 32, 20 epochs.

    python -m cot2align_jax.train --config=configs/paper/gpt2xl_to_gpt2.py --workdir=DIR \
        --config.teacher.path=/ckpt/gpt2-xl-dolly-sft --config.data.rationales=FILE
"""

from cot2align_jax.training.config import load_sibling


def get_config(arg=None):
  common = load_sibling(__file__, "_common.py")
  base, rate = common.pick_base(arg, "kd", {"kd": 0.7})
  return common.paper_config(
      __file__, teacher="gpt2-xl", student="gpt2", base=base, kd_rate=rate, divergence="fkl",
      lr=5e-4, epochs=20, lora=False)
