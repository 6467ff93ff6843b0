"""Data: tokenizer and BPE trainer, image ops, sources (synthetic, TFDS, webdataset, ArrayRecord, CSV), grain pipelines."""
