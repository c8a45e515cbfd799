"""Generation-based ROUGE-L, GSM8K exact match, reports and plots."""
