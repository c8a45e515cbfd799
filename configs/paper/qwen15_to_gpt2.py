"""Qwen1.5-1.8B → GPT2-120M (different vocabularies): CoT2Align over DSKD-CMA with the skewed
reverse KL (λ_skew 0.1), kd_rate 0.5; full fine-tuning, lr 5e-4, batch 32, 20 epochs.

    python -m cot2align_jax.train --config=configs/paper/qwen15_to_gpt2.py --workdir=DIR \
        --config.teacher.path=/ckpt/qwen1.5-1.8b-dolly-sft --config.data.rationales=FILE

arg: `[base=]<base KD>`: dskd_cma (default); uld / mined use kd_rate 0.5 as well.
"""

from cot2align_jax.training.config import load_sibling


def get_config(arg=None):
  common = load_sibling(__file__, "_common.py")
  base, rate = common.pick_base(arg, "dskd_cma", {"dskd_cma": 0.5, "uld": 0.5, "mined": 0.5})
  return common.paper_config(
      __file__, teacher="Qwen/Qwen1.5-1.8B", student="gpt2", base=base, kd_rate=rate,
      divergence="srkl" if base == "dskd_cma" else "fkl", lr=5e-4, epochs=20, lora=False,
      teacher_valid_vocab=-1)  # Qwen's embedding has padding rows past the tokenizer
