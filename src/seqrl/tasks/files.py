"""Problems from files: JSONL, CSV, Parquet, or a local Hugging Face ``datasets`` directory.

A column mapping names which field holds the prompt, the reference answer and, for code, the
tests; every other field is kept in ``Example.meta``. A malformed row is an error that names the
file, the row (1-based, as an editor shows it; the header line of a CSV is row 0) and the field,
or, with ``on_error="skip"``, is skipped and counted. Bytes that are not UTF-8 and text that
cannot be written as UTF-8 (a lone surrogate from a ``"\\ud800"`` escape) are malformed rows too.
Each example records where it came from in ``Example.source`` (``"data.jsonl, row 17"``).

>>> rows = load_examples("examples/data/gsm8k_toy.jsonl", columns={"prompt": "question"})
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from seqrl.tasks.base import Example

FIELDS = ("prompt", "answer", "tests")
"""Fields a column mapping may name; ``prompt`` and ``answer`` are required unless said."""

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """A data file or row that cannot be used; the message names file, row and field."""


@dataclass(frozen=True)
class LoadReport:
    path: str
    rows: int  # rows read (valid + skipped)
    skipped: int
    first_problems: tuple[str, ...]  # up to 5 messages of skipped rows


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
"""What ``errors="surrogateescape"`` decodes a byte that is not UTF-8 to (valid UTF-8 never does)."""

_SURROGATE = re.compile("[\ud800-\udfff]")


def _bad_byte(text: str) -> str | None:
    """Where ``text`` (read with surrogateescape) holds a byte that is not UTF-8, else None."""
    if text.isascii():
        return None
    found = _ESCAPED_BYTE.search(text)
    if found is None:
        return None
    byte = ord(found.group()) - 0xDC00
    return (
        f"byte 0x{byte:02x} at character {found.start() + 1} is not UTF-8 (save the file as "
        "UTF-8, e.g. `iconv -f latin1 -t utf-8 in > out` for a Latin-1 file)"
    )


def _open_text(path: Path, **kwargs):
    """``path`` as UTF-8 text in which bad bytes are escaped (see :func:`_bad_byte`), not fatal."""
    return path.open(encoding="utf-8", errors="surrogateescape", **kwargs)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if (problem := _bad_byte(line)) is not None:
                yield line_no, DataError(problem)
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as err:
                yield line_no, DataError(f"not valid JSON ({err.msg} at column {err.colno})")


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with _open_text(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for i, name in enumerate(header, start=1):  # every row needs it: no skipping past it
            if (problem := _bad_byte(name)) is not None:
                raise DataError(f"{path}, row 0 (the header), column {i}: {problem}")
        for row_no, row in enumerate(reader, start=1):
            if None in row:  # more cells than header columns
                yield row_no, DataError(f"{len(row[None])} more cell(s) than the header has")
                continue
            problems = [
                (column, problem)
                for column, cell in row.items()
                if cell and (problem := _bad_byte(cell)) is not None
            ]
            if problems:
                column, problem = problems[0]
                yield row_no, DataError(f"field {column!r}: {problem}")
            else:
                yield row_no, row


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    yield from enumerate(pq.read_table(path).to_pylist(), start=1)


def _datasets_rows(path: Path, split: str | None) -> Iterator[tuple[int, Any]]:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise DataError(
            f"{path} is a directory: reading a saved Hugging Face dataset needs `datasets` "
            "(pip install datasets), or point at a .jsonl/.csv/.parquet file"
        ) from None
    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if split is None or split not in ds:
            raise DataError(f"{path} holds splits {sorted(ds)}; choose one with split=...")
        ds = ds[split]
    yield from enumerate(ds, start=1)


def iter_rows(path: str | Path, *, split: str | None = None) -> Iterator[tuple[int, Any]]:
    """(row number, raw row or DataError) pairs of a data file in any supported format."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        return _datasets_rows(path, split)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: unknown data format {path.suffix!r}; use one of "
            f"{', '.join(sorted(FORMATS))} or a saved Hugging Face dataset directory"
        )
    return {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}[fmt](path)


def _example(
    row: Any, columns: Mapping[str, str], required: tuple[str, ...], source: str | None = None
) -> Example:
    if not isinstance(row, Mapping):
        raise DataError(f"expected an object with fields, got {type(row).__name__}")
    values: dict[str, Any] = {}
    for field in FIELDS:
        column = columns.get(field, field)
        if column not in row or row[column] is None or row[column] == "":
            if field in required:
                present = ", ".join(map(repr, row)) or "none"
                raise DataError(
                    f"field {column!r} ({field}) is missing or empty; present: {present}"
                )
            continue
        values[field] = row[column]
    for field in ("prompt", "answer"):
        if field in values and not isinstance(values[field], (str, int, float)):
            raise DataError(
                f"field {columns.get(field, field)!r} ({field}) must be text or a number, "
                f"got {type(values[field]).__name__}"
            )
    for field in ("prompt", "answer", "tests"):
        value = values.get(field)
        if isinstance(value, str) and (found := _SURROGATE.search(value)) is not None:
            raise DataError(
                f"field {columns.get(field, field)!r} ({field}) holds a lone surrogate "
                f"{found.group()!r} at character {found.start() + 1}, which no tokenizer can "
                "encode (a broken \\u escape in the file?)"
            )
    used = {columns.get(f, f) for f in FIELDS}
    meta = {k: v for k, v in row.items() if k not in used}
    if "tests" in values:
        meta["tests"] = values["tests"]
    return Example(
        prompt=str(values["prompt"]),
        answer=str(values.get("answer", "")),
        meta=meta,
        source=source,
    )


def load_examples(
    path: str | Path,
    *,
    columns: Mapping[str, str] | None = None,
    required: tuple[str, ...] = ("prompt", "answer"),
    on_error: Literal["raise", "skip"] = "raise",
    split: str | None = None,
) -> tuple[list[Example], LoadReport]:
    """Every usable row of ``path`` as an :class:`Example`, and what was skipped.

    ``columns`` maps seqrl's fields to the file's names, e.g. ``{"prompt": "question"}``.
    With ``on_error="raise"`` the first bad row raises :class:`DataError` naming file, row and
    field; with ``"skip"`` bad rows are left out and counted in the report.
    """
    columns = dict(columns or {})
    unknown = set(columns) - set(FIELDS)
    if unknown:
        raise DataError(f"unknown column-mapping field(s) {sorted(unknown)}; valid: {FIELDS}")
    examples, problems, rows = [], [], 0
    for row_no, row in iter_rows(path, split=split):
        rows += 1
        try:
            if isinstance(row, DataError):
                raise row
            examples.append(_example(row, columns, required, f"{path}, row {row_no}"))
        except DataError as err:
            message = f"{path}, row {row_no}: {err}"
            if on_error == "raise":
                raise DataError(
                    message + " (fix the row, or pass on_error='skip' to leave such rows out)"
                ) from None
            problems.append(message)
    if not examples:
        raise DataError(f"{path}: no usable rows ({rows} read, {len(problems)} malformed)")
    report = LoadReport(str(path), rows, len(problems), tuple(problems[:5]))
    return examples, report
