"""Host-side cross-tokenizer alignment: byte-offset spans, exact token pairs, MinED + DTW."""
