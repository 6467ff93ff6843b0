"""Checkpoint import, the on-disk format, and (later) upcycling."""
