"""A TSV/CSV of (image path, caption) rows, as open_clip's ``--dataset-type csv`` reads them.

Rows naming the same image are grouped into one record holding all its captions (first-appearance order), so one
file format serves training (a random caption per image per epoch) and retrieval eval (all captions). A header is
optional: a first row whose cells are known column names (``filepath``/``path``/``image``..., ``caption``/
``text``/``title``) picks the columns by name; otherwise every row must have exactly two columns.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os

from clipup_jax.data.sources.records import record
from clipup_jax.storage import Path, as_path, is_remote

PATH_COLUMNS = ("filepath", "path", "file", "filename", "image", "image_path", "img")
CAPTION_COLUMNS = ("caption", "text", "title", "sentence", "raw")
DELIMITERS = {".tsv": "\t", ".csv": ","}


@dataclasses.dataclass(frozen=True)
class CaptionRow:
    path: str
    caption: str | bytes  # bytes when the file's bytes there are not UTF-8
    line: int


def _cell_text(cell: str) -> str | bytes:
    """Undo surrogateescape: text that was not UTF-8 goes back to its raw bytes, for the pipeline to count."""
    try:
        cell.encode("utf-8")
        return cell
    except UnicodeEncodeError:
        return cell.encode("utf-8", "surrogateescape")


def read_table(path: str | os.PathLike[str]) -> list[CaptionRow]:
    """All rows of a ``.tsv`` (tab, no quoting) or ``.csv`` (comma, RFC 4180 quoting); blank lines are ignored.

    A malformed row is an error naming the file and line: guessing which cell is the caption would train on
    garbage silently.
    """
    path = as_path(path)
    delimiter = DELIMITERS.get(path.suffix.lower())
    if delimiter is None:
        raise ValueError(f"{path}: captions table must be .tsv or .csv, got {path.suffix or 'no suffix'!r}")
    try:
        text = path.read_bytes().decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    except OSError as e:
        raise FileNotFoundError(f"{path}: cannot read captions table ({e.strerror or e})") from e
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    kind = "tab" if delimiter == "\t" else "comma"
    rows: list[CaptionRow] = []
    columns: tuple[int, int, int] | None = None  # path column, caption column, expected width
    try:
        for cells in reader:
            if not cells or all(not c.strip() for c in cells):
                continue
            if columns is None:
                names = [c.strip().lower() for c in cells]
                path_col = next((i for i, n in enumerate(names) if n in PATH_COLUMNS), None)
                caption_col = next((i for i, n in enumerate(names) if n in CAPTION_COLUMNS), None)
                if path_col is not None and caption_col is not None:
                    columns = (path_col, caption_col, len(cells))
                    continue
                columns = (0, 1, 2)
            path_col, caption_col, width = columns
            if len(cells) != width:
                raise ValueError(f"{path}: line {reader.line_num}: expected {width} {kind}-separated columns "
                                 f"(path, caption), got {len(cells)}: {delimiter.join(cells)[:80]!r}")
            image = cells[path_col].strip()
            if not image:
                raise ValueError(f"{path}: line {reader.line_num}: empty image path")
            rows.append(CaptionRow(image, _cell_text(cells[caption_col].strip()), reader.line_num))
    except csv.Error as e:
        raise ValueError(f"{path}: line {reader.line_num}: {e}") from e
    if not rows:
        raise ValueError(f"{path}: no (path, caption) rows")
    return rows


def group_rows(rows: list[CaptionRow]) -> list[tuple[str, tuple[str | bytes, ...], int]]:
    """``(path, captions, first line)`` per distinct image path, in first-appearance order."""
    groups: dict[str, tuple[list[str | bytes], int]] = {}
    for row in rows:
        groups.setdefault(row.path, ([], row.line))[0].append(row.caption)
    return [(p, tuple(captions), line) for p, (captions, line) in groups.items()]


class CaptionsTableSource:
    """``len``/``getitem`` over the distinct images of a table; relative paths are resolved against its folder.
    The table and its images may be local or on gs://."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._table = as_path(os.path.expanduser(path))
        if not self._table.is_file():
            raise FileNotFoundError(f"captions table {self._table} does not exist")
        self._root = self._table.parent
        self._groups = group_rows(read_table(self._table))
        first, _, line = self._groups[0]
        if not self._image(first).is_file():  # catches a wrong root before a run skips every image
            raise FileNotFoundError(f"{self._table}: line {line}: image {first} does not exist "
                                    f"(relative paths are resolved against {self._root})")

    def __len__(self) -> int:
        return len(self._groups)

    def __getitem__(self, index: int) -> dict:
        image, captions, _ = self._groups[int(index)]
        try:
            data = self._image(image).read_bytes()
        except OSError:
            data = b""  # a file gone since construction: skipped and counted like a corrupt image
        return record(data, captions, image)

    def _image(self, image: str) -> Path:
        return as_path(image) if is_remote(image) or os.path.isabs(image) else self._root / image

    def __repr__(self) -> str:
        return f"CaptionsTableSource({self._table}, {len(self)} images)"
