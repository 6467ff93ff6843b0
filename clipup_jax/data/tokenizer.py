"""CLIP's byte-level BPE tokenizer, behaving exactly like OpenAI's ``SimpleTokenizer``.

Pure Python (``regex`` + ``ftfy``) so it runs inside any data-loader worker without torch or Rust.
Two on-disk formats are accepted, both yielding the same ids for the same merges:

* an OpenAI merges file (``bpe_simple_vocab_16e6.txt.gz`` or any ``*.txt[.gz]`` in that layout): ids follow
  from the merge order (256 byte symbols, the same with ``</w>``, merge results, SOT, EOT);
* a Hugging Face directory with ``vocab.json`` + ``merges.txt``: ids are read from ``vocab.json``.

Known differences from HF ``CLIPTokenizer`` (which is a fine oracle otherwise): HF has no ftfy / html.unescape
step (entities, curly quotes, ligatures, full-width forms stay as they are), and HF cuts ``<|endoftext|>`` out of
text before splitting, whereas OpenAI's regex (and ours) reads ``"<<|endoftext|>"`` as ``"<<|" "endoftext" "|>"``.
HF also pads with EOT; we pad with 0 like OpenAI/open_clip.
"""

from __future__ import annotations

import functools
import gzip
import html
import json
from collections.abc import Iterable, Sequence

import ftfy
import numpy as np
import regex

from clipup_jax.storage import Path, PathLike, as_path

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
PAD_TOKEN_ID = 0
# OpenAI builds its 49408-entry vocab from only the first 49152-256-2 merge lines of its file (the file holds
# 262k lines); capping every OpenAI-layout merges file at this count reproduces that and is a no-op for smaller ones.
OPENAI_MAX_MERGES = 49152 - 256 - 2
HF_VOCAB_FILE = "vocab.json"
HF_MERGES_FILE = "merges.txt"

SPLIT_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
# Cleared wholesale when full: cheaper than LRU bookkeeping on the hot path, and caption vocabularies are small.
_DEFAULT_CACHE_SIZE = 1 << 18


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table; its insertion order fixes ids 0..255."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def base_vocab() -> list[str]:
    """The first 512 vocab entries in OpenAI order: byte symbols, then the same with ``</w>``."""
    symbols = list(bytes_to_unicode().values())
    return symbols + [s + END_OF_WORD for s in symbols]


def clip_vocab(merges: Sequence[tuple[str, str]]) -> list[str]:
    """The full OpenAI-ordered vocab list for ``merges`` (index = id). Duplicate merge results keep both slots."""
    return base_vocab() + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]


def clean_text(text: str) -> str:
    """OpenAI's clean-up: ftfy, html-unescape twice, strip, collapse whitespace, lowercase."""
    if text.isascii() and text.isprintable() and "&" not in text:
        # Exact shortcut: ftfy and html.unescape cannot change printable ASCII without '&' (every ftfy fixer
        # needs non-ASCII, control characters or an entity), and '&' is the only way into html.unescape.
        return " ".join(text.split()).lower()
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).lower()


def pre_tokenize(text: str) -> list[str]:
    """Split cleaned text into the pieces BPE runs on (letters runs, single digits, punctuation runs, specials)."""
    return SPLIT_PATTERN.findall(text)


def byte_encode(piece: str) -> str:
    """Map a piece's UTF-8 bytes to GPT-2's printable stand-ins (one character per byte)."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in piece.encode("utf-8"))


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic: trust content over the file name
            raw = gzip.decompress(raw)
        return raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read BPE merges file {path}: {e}") from e


def _parse_merges(text: str, path: Path, require_header: bool) -> list[tuple[str, str]]:
    """Parse ``a b`` lines after the header line; reject anything that is not exactly two symbols."""
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if lines and "#version" in lines[0]:
        lines = lines[1:]
    elif require_header:
        first = lines[0] if lines else "<empty file>"
        raise ValueError(f"{path}: first line must be a '#version: ...' header, got {first!r}")
    merges = []
    for lineno, line in enumerate(lines, start=2):
        parts = line.rstrip("\r").split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(f"{path}: line {lineno} is not a merge of two space-separated symbols: {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def source_files(path: PathLike) -> list[Path]:
    """The file(s) that define the tokenizer at ``path`` (local or ``gs://``), so a checkpoint writer can copy
    them verbatim."""
    path = as_path(path)
    if path.is_dir():
        files = [path / HF_VOCAB_FILE, path / HF_MERGES_FILE]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"tokenizer directory {path} lacks {', '.join(missing)} (needs vocab.json + merges.txt)"
            )
        return files
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file {path} does not exist (expected a *.txt.gz / *.txt merges file or a directory)"
        )
    return [path]


def merge_pair(word: list[str], pair: tuple[str, str]) -> list[str]:
    """`word` with every non-overlapping occurrence of `pair` (left to right) joined into one symbol."""
    first, second = pair
    out: list[str] = []
    i, n = 0, len(word)
    while i < n:
        if i < n - 1 and word[i] == first and word[i + 1] == second:
            out.append(first + second)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


class Tokenizer:
    """CLIP tokenizer: ``tok(texts) -> int32 (N, context_length)`` of ``[SOT] ids [EOT] 0 0 ...``."""

    def __init__(
        self,
        encoder: dict[str, int],
        merges: Sequence[tuple[str, str]],
        cache_size: int = _DEFAULT_CACHE_SIZE,
    ) -> None:
        """``encoder`` maps every token (incl. all 512 base symbols and both specials) to its id."""
        missing = [t for t in (SOT_TOKEN, EOT_TOKEN) if t not in encoder]
        if missing:
            raise ValueError(f"encoder lacks the special tokens {missing}")
        self._encoder = dict(encoder)
        self._decoder = {i: t for t, i in self._encoder.items()}
        self._ranks = {tuple(m): r for r, m in enumerate(merges)}
        self._sot = self._encoder[SOT_TOKEN]
        self._eot = self._encoder[EOT_TOKEN]
        self._specials = {SOT_TOKEN: (self._sot,), EOT_TOKEN: (self._eot,)}
        self._vocab_size = max(self._encoder.values()) + 1
        self._cache: dict[str, tuple[int, ...]] = {}
        self._cache_size = cache_size

    # ----- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_merges(cls, merges: Sequence[tuple[str, str]], **kwargs) -> Tokenizer:
        """Build with OpenAI vocab order from a merge list. If two merges yield the same token, the later id wins
        (as in OpenAI's dict) and the earlier id is never produced nor decodable."""
        vocab = clip_vocab(merges)
        return cls({t: i for i, t in enumerate(vocab)}, merges, **kwargs)

    @classmethod
    def from_path(cls, path: PathLike, **kwargs) -> Tokenizer:
        """Load an OpenAI merges file or a HF ``vocab.json`` + ``merges.txt`` directory.

        A merges file (gzip or plain, detected from its bytes) must start with a ``#version`` header line; at most
        its first ``OPENAI_MAX_MERGES`` merges are used, which reproduces OpenAI's 49408 vocab from its 262k-line
        file and keeps every merge of smaller files. A HF directory uses all merges and takes ids from vocab.json.
        """
        files = source_files(path)
        if len(files) == 1:
            merges = _parse_merges(_read_text(files[0]), files[0], require_header=True)
            return cls.from_merges(merges[:OPENAI_MAX_MERGES], **kwargs)
        vocab_path, merges_path = files
        try:
            encoder = json.loads(vocab_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot parse {vocab_path}: {e}") from e
        if not isinstance(encoder, dict) or not all(isinstance(v, int) for v in encoder.values()):
            raise ValueError(f"{vocab_path} must be a JSON object mapping token -> integer id")
        missing = [t for t in (*base_vocab(), SOT_TOKEN, EOT_TOKEN) if t not in encoder]
        if missing:
            raise ValueError(
                f"{vocab_path} lacks {len(missing)} required tokens (byte symbols / specials), e.g. {missing[:3]}"
            )
        merges = _parse_merges(_read_text(merges_path), merges_path, require_header=False)
        for lineno, (a, b) in enumerate(merges, start=2):
            if a + b not in encoder:
                raise ValueError(
                    f"{merges_path}: line {lineno} merges {a!r} {b!r} into {a + b!r}, absent from {vocab_path}"
                )
        return cls(encoder, merges, **kwargs)

    # ----- properties ---------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Embedding-table rows needed: max id + 1 (49408 for OpenAI's file)."""
        return self._vocab_size

    @property
    def sot_token_id(self) -> int:
        return self._sot

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def pad_token_id(self) -> int:
        """0, as in OpenAI/open_clip. It is the real token '!'; EOT pooling and the causal mask make it harmless."""
        return PAD_TOKEN_ID

    # ----- BPE ----------------------------------------------------------------------------------------------------
    def _bpe(self, word: list[str]) -> list[str]:
        """Merge the lowest-ranked adjacent pair everywhere (left to right) until no ranked pair remains."""
        ranks = self._ranks
        while len(word) > 1:
            best_rank = None
            best = None
            for pair in zip(word, word[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best = r, pair
            if best is None:
                break
            word = merge_pair(word, best)
        return word

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        """Cache miss: byte-map, BPE with ``</w>`` on the last symbol, look up ids."""
        ids = self._specials.get(piece)
        if ids is None:
            chars = byte_encode(piece)
            word = list(chars[:-1]) + [chars[-1] + END_OF_WORD]
            ids = tuple(self._encoder[t] for t in self._bpe(word))
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[piece] = ids
        return ids

    # ----- public API ---------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without SOT/EOT. A literal ``<|endoftext|>`` in the text maps to the special id."""
        cache = self._cache
        out: list[int] = []
        for piece in SPLIT_PATTERN.findall(clean_text(text)):
            ids = cache.get(piece)
            if ids is None:
                ids = self._encode_piece(piece)
            out.extend(ids)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: SOT is dropped, decoding stops at the first EOT (so padded rows decode cleanly),
        ``</w>`` becomes a space and the result is stripped. Pad id 0 *before* any EOT decodes as '!'.
        Invalid UTF-8 byte sequences become U+FFFD."""
        table = self._id_to_bytes
        parts = []
        for i in ids:
            i = int(i)
            if i == self._eot:
                break
            if i == self._sot:
                continue
            try:
                parts.append(table[i])
            except KeyError:
                raise ValueError(f"token id {i} is not in the vocabulary (size {self._vocab_size})") from None
        return b"".join(parts).decode("utf-8", errors="replace").strip()

    @functools.cached_property
    def _id_to_bytes(self) -> dict[int, bytes]:
        """Per-token bytes, with a trailing ``</w>`` turned into a space (built on first decode)."""
        byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        table = {}
        for i, token in self._decoder.items():
            if token in self._specials:
                continue
            word_end = token.endswith(END_OF_WORD)
            body = token[: -len(END_OF_WORD)] if word_end else token
            try:
                raw = bytes(byte_decoder[c] for c in body)
            except KeyError:  # a vocab.json entry outside the byte alphabet; encode() never emits it
                raw = body.encode("utf-8")
            table[i] = raw + (b" " if word_end else b"")
        return table

    def __call__(self, texts: str | Sequence[str], context_length: int = 77) -> np.ndarray:
        """int32 ``(N, context_length)``: ``[SOT] ids [EOT]`` right-padded with 0; too long -> cut, last slot EOT."""
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 to hold SOT and EOT, got {context_length}")
        if isinstance(texts, str):
            texts = [texts]
        result = np.zeros((len(texts), context_length), dtype=np.int32)
        sot, eot = self._sot, self._eot
        for row, text in enumerate(texts):
            tokens = [sot, *self.encode(text), eot]
            if len(tokens) > context_length:
                tokens = tokens[:context_length]
                tokens[-1] = eot
            result[row, : len(tokens)] = tokens
        return result

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self._vocab_size}, merges={len(self._ranks)})"
