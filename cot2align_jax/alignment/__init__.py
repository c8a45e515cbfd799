"""Host-side cross-tokenizer alignment: byte-offset spans, exact token pairs, MinED + DTW."""

from cot2align_jax.alignment.mined import (build_mined_vocab_map, distance_matrix, dtw_align,
                                           dtw_path, edit_distances, mined_arrays, mined_map,
                                           nearest_by_edit_distance, one_to_one)
from cot2align_jax.alignment.spans import (NO_SPAN, Chunk, TokenBytes, byte_spans,
                                           char_to_byte_offsets, chunks, clean_text, eta_arrays,
                                           exact_pairs, pairs_to_arrays)

__all__ = [
  "NO_SPAN", "Chunk", "TokenBytes", "build_mined_vocab_map", "byte_spans", "char_to_byte_offsets",
  "chunks", "clean_text", "distance_matrix", "dtw_align", "dtw_path", "edit_distances",
  "eta_arrays", "exact_pairs", "mined_arrays", "mined_map", "nearest_by_edit_distance",
  "one_to_one", "pairs_to_arrays",
]
