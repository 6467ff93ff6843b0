"""Embedding, retrieval and zero-shot evaluation."""
