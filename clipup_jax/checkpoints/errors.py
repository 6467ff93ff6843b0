"""The one error type checkpoint code raises: CLIs print its message as a single line."""


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used; the message names the file, key or shape."""


def key_list(keys, limit: int = 12) -> str:
    """A bounded, sorted listing of keys for error messages."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
