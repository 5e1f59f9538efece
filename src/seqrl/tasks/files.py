"""Problems from files: JSONL, CSV, Parquet, a Hugging Face ``datasets`` directory or Hub name.

A column mapping names which field holds the prompt, the reference answer and, for code, the
tests; every other field is kept in ``Example.meta``. A malformed row is an error that names the
file, the row (1-based, as an editor shows it; the header line of a CSV is row 0) and the field,
or, with ``on_error="skip"``, is skipped and counted. Bytes that are not UTF-8 and text that
cannot be written as UTF-8 (a lone surrogate from a ``"\\ud800"`` escape) are malformed rows too.
Each example records where it came from in ``Example.source`` (``"data.jsonl, row 17"``).

A row may hold a chat instead of a prompt: ``messages``, a list of ``{"role", "content"}``
turns (system, user, assistant, ...). The turns up to the last user turn are the prompt (kept in
``Example.meta["messages"]``, rendered by the model's chat template, see
:mod:`seqrl.tasks.prompts`); a final assistant turn is the demonstration for supervised
training and, when the row has no ``answer``, the reference answer. ``Example.prompt`` is the
last user turn's text.

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

FIELDS = ("prompt", "answer", "tests", "messages", "completion")
"""Fields a column mapping may name; ``prompt`` (or ``messages``) and ``answer`` are required
unless said. ``completion`` is the demonstration for supervised training (default: the answer)."""

ROLES = ("system", "user", "assistant", "tool")

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


def _datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{what}: reading Hugging Face datasets needs `datasets` "
            "(pip install 'seqrl[data]'), or point at a .jsonl/.csv/.parquet file"
        ) from None
    return datasets


def _one_split(ds, where: str, split: str | None, default: str | None = None):
    """``ds`` itself, or one split of it when it holds several (a DatasetDict): ``split``, else
    ``default`` when it has that split, else its only split."""
    if hasattr(ds, "keys") and callable(ds.keys):  # a DatasetDict: name → Dataset
        names = sorted(ds.keys())
        if split is None:
            split = default if default in names else names[0] if len(names) == 1 else None
        if split not in names:
            which = "choose one" if split is None else f"it has no split {split!r}; choose one"
            raise DataError(
                f"{where} holds the splits {names}: {which} with task.train_split / "
                "task.test_split (seqrl eval --split)"
            )
        ds = ds[split]
    return ds


def _datasets_rows(
    path: Path, split: str | None, subset: str | None, default: str | None
) -> Iterator[tuple[int, Any]]:
    """A directory: ``save_to_disk`` output, or data files as a Hub dataset repository holds them."""
    datasets = _datasets(str(path))
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        ds = datasets.load_from_disk(str(path))
    else:
        try:
            ds = datasets.load_dataset(str(path), subset)
        except Exception as err:  # datasets raises many types for an unreadable folder
            raise DataError(
                f"{path} is a directory but neither a saved dataset (save_to_disk) nor a folder "
                f"of data files `datasets` can read ({type(err).__name__}: {_first_line(err)})"
            ) from None
    yield from enumerate(_one_split(ds, str(path), split, default), start=1)


HUB_DATASET = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""``org/name``: a Hugging Face Hub dataset id (tried only when no such local path exists)."""


def _hub_rows(
    name: str, split: str | None, subset: str | None, default: str | None
) -> Iterator[tuple[int, Any]]:
    """A Hub dataset through the ``datasets`` cache (downloads only when online, not cached)."""
    datasets = _datasets(name)
    try:
        ds = datasets.load_dataset(name, subset)
    except Exception as err:  # offline, unknown name, gated, ...: one clear message
        raise DataError(
            f"data {name!r} is not a local file or directory, and loading it as a Hugging Face "
            f"Hub dataset failed ({type(err).__name__}: {_first_line(err)}). Offline, download "
            f"it where there is a network (`hf download {name} --repo-type dataset --local-dir "
            "DIR`) and give DIR, or save the rows to a .jsonl file"
        ) from None
    yield from enumerate(_one_split(ds, f"dataset {name!r}", split, default), start=1)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no message"


def iter_rows(
    path: str | Path,
    *,
    split: str | None = None,
    subset: str | None = None,
    default_split: str | None = None,
) -> Iterator[tuple[int, Any]]:
    """(row number, raw row or DataError) pairs of a data file in any supported format.

    ``path`` may also be a directory (a saved dataset, or data files laid out as a Hub dataset
    repository) or a Hub dataset id ``org/name`` (through the ``datasets`` cache). ``split``
    picks one split of a dataset that has several (when None: ``default_split`` if the dataset
    has it, else its only split); ``subset`` is the Hub dataset's config name.
    """
    text = str(path)
    path = Path(path)
    if not path.exists():
        if HUB_DATASET.fullmatch(text) and path.suffix.lower() not in FORMATS:
            return _hub_rows(text, split, subset, default_split)
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        return _datasets_rows(path, split, subset, default_split)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: unknown data format {path.suffix!r}; use one of "
            f"{', '.join(sorted(FORMATS))}, a saved Hugging Face dataset directory or a Hub "
            "dataset id (org/name)"
        )
    return {"jsonl": _jsonl_rows, "csv": _csv_rows, "parquet": _parquet_rows}[fmt](path)


def _chat(turns: Any, column: str) -> tuple[list[dict], str | None]:
    """(prompt turns up to the last user turn, a final assistant turn's text or None)."""
    if not isinstance(turns, (list, tuple)) or not turns:
        raise DataError(f"field {column!r} (messages) must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or not {"role", "content"} <= set(turn):
            raise DataError(
                f"field {column!r} (messages), turn {i}: expected {{'role': ..., 'content': ...}}, "
                f"got {turn!r:.80}"
            )
        role, content = turn["role"], turn["content"]
        if role not in ROLES or not isinstance(content, str):
            raise DataError(
                f"field {column!r} (messages), turn {i}: role must be one of {', '.join(ROLES)} "
                f"and content text; got role {role!r} and {type(content).__name__} content"
            )
        out.append({"role": role, "content": content})
    reply = None
    if out[-1]["role"] == "assistant":
        reply = out.pop()["content"]
    if not out or out[-1]["role"] != "user":
        raise DataError(
            f"field {column!r} (messages): the prompt must end with a user turn (optionally "
            "followed by one assistant turn, the demonstration)"
        )
    return out, reply


def _example(
    row: Any, columns: Mapping[str, str], required: tuple[str, ...], source: str | None = None
) -> Example:
    if not isinstance(row, Mapping):
        raise DataError(f"expected an object with fields, got {type(row).__name__}")
    values: dict[str, Any] = {}
    turns, reply = None, None
    messages = columns.get("messages", "messages")
    if row.get(messages) is not None and columns.get("prompt", "prompt") not in row:
        turns, reply = _chat(row[messages], messages)
        values["prompt"] = turns[-1]["content"]
        if reply is not None:
            values["completion"] = reply
            values["answer"] = reply
    for field in ("prompt", "answer", "tests", "completion"):
        column = columns.get(field, field)
        if column not in row or row[column] is None or row[column] == "":
            if field in required and field not in values:
                present = ", ".join(map(repr, row)) or "none"
                alternative = " (or a 'messages' list)" if field == "prompt" else ""
                raise DataError(
                    f"field {column!r} ({field}){alternative} is missing or empty; "
                    f"present: {present}"
                )
            continue
        values[field] = row[column]
    for field in ("prompt", "answer", "completion"):
        if field in values and not isinstance(values[field], (str, int, float)):
            raise DataError(
                f"field {columns.get(field, field)!r} ({field}) must be text or a number, "
                f"got {type(values[field]).__name__}"
            )
    for field in ("prompt", "answer", "tests", "completion"):
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
    if "completion" in values:
        meta["completion"] = str(values["completion"])
    if turns is not None:
        meta["messages"] = turns
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
    subset: str | None = None,
    default_split: str | None = None,
) -> tuple[list[Example], LoadReport]:
    """Every usable row of ``path`` as an :class:`Example`, and what was skipped.

    ``columns`` maps seqrl's fields to the file's names, e.g. ``{"prompt": "question"}``;
    ``split`` and ``subset`` choose within a Hugging Face dataset (see :func:`iter_rows`).
    With ``on_error="raise"`` the first bad row raises :class:`DataError` naming file, row and
    field; with ``"skip"`` bad rows are left out and counted in the report.
    """
    columns = dict(columns or {})
    unknown = set(columns) - set(FIELDS)
    if unknown:
        raise DataError(f"unknown column-mapping field(s) {sorted(unknown)}; valid: {FIELDS}")
    examples, problems, rows = [], [], 0
    for row_no, row in iter_rows(path, split=split, subset=subset, default_split=default_split):
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
