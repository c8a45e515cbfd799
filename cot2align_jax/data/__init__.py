"""Data: TFDS builders (array_record), plain/CoT records and views, the grain pipeline."""
