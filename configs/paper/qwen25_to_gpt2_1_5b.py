"""Qwen2.5-7B-Instruct → GPT2-1.5B (GPT2-XL; different vocabularies): CoT2Align over DSKD-CMA
(forward KL), kd_rate 0.9, or over ULD / MinED with kd_rate 0.6; LoRA on the student; lr 1e-3,
batch 32, 10 epochs.

    python -m cot2align_jax.train --config=configs/paper/qwen25_to_gpt2_1_5b.py:uld ...

arg: `[base=]<base KD>`: dskd_cma (default), uld or mined. LoRA r=256, α=8 on the GPT-2
modules c_attn, c_proj, c_fc (student.lora; merged into the weights on export).
"""

from cot2align_jax.training.config import load_sibling


def get_config(arg=None):
  common = load_sibling(__file__, "_common.py")
  base, rate = common.pick_base(arg, "dskd_cma", {"dskd_cma": 0.9, "uld": 0.6, "mined": 0.6})
  return common.paper_config(
      __file__, teacher="Qwen/Qwen2.5-7B-Instruct", student="gpt2-xl", base=base, kd_rate=rate,
      divergence="fkl", lr=1e-3, epochs=10, lora=True, lora_targets=common.GPT2_LORA_TARGETS,
      teacher_valid_vocab=-1)
