"""Input pipeline pieces: tokenizer, BPE trainer."""
