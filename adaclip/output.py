"""Results on stdout: a table for people, JSON / JSONL / CSV for pipelines.

Record streams (predictions) are written as they come in jsonl and csv, so `adaclip predict - < paths`
over 10,000 images shows results immediately and holds one batch in memory; tables and JSON need the
whole set and are written at the end.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal, TextIO

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

Format = Literal["table", "json", "jsonl", "csv"]
FORMATS = ("table", "json", "jsonl", "csv")


def stdout_console() -> Console:
    return Console(file=sys.stdout, highlight=False, soft_wrap=False)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def encodable(text: str) -> str:
    """File names that are not valid UTF-8 arrive as lone surrogates (surrogateescape); write their bytes
    as \\xNN escapes so stdout can always encode them (JSON and CSV keep everything else exact)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# C0 controls, DEL and C1 controls: a terminal acts on them (clear screen, colours, titles, CSI).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def _escape_control(match: re.Match) -> str:
    return f"\\x{ord(match.group()):02x}"


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """Text for a person's terminal: `encodable`, and every control character shown as \\xNN, so a
    file name cannot clear the screen or forge output. `keep_newlines` for messages of several lines."""
    return (_CONTROL_BUT_NEWLINE if keep_newlines else _CONTROL).sub(_escape_control, encodable(text))


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write null instead of invalid JSON; make every string encodable."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str):
        return encodable(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


# JSON escapes C0 controls itself; DEL and C1 are legal raw, so they are escaped too (same value).
_JSON_RAW_CONTROL = re.compile("[\x7f-\x9f]")


def dumps(document: Any, *, indent: int | None = 2) -> str:
    text = json.dumps(_clean(document), indent=indent, ensure_ascii=False, default=_json_default)
    return _JSON_RAW_CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def write_json(document: Any, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    out.write(dumps(document) + "\n")
    out.flush()


def write_records(
    records: Iterable[dict[str, Any]],
    fmt: Format,
    columns: Sequence[str],
    *,
    title: str | None = None,
    out: TextIO | None = None,
    compact: bool = False,
) -> int:
    """Write flat records in `fmt`; jsonl and csv stream. Returns how many were written. A `compact`
    table draws no column borders, so wide ones (a leaderboard) fit 80 columns."""
    out = out or sys.stdout
    count = 0
    if fmt == "jsonl":
        for record in records:
            out.write(dumps(record, indent=None) + "\n")
            out.flush()
            count += 1
    elif fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for record in records:
            writer.writerow({k: _csv_cell(record.get(k)) for k in columns})
            out.flush()
            count += 1
    elif fmt == "json":
        collected: list[dict[str, Any]] = []
        try:
            collected.extend(records)
        finally:  # interrupted or failed midway: still print what was computed, as valid JSON
            write_json(collected, out)
        count = len(collected)
    else:
        table = (
            Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
            if compact
            else Table(title=title, show_lines=False)
        )
        for column in columns:
            table.add_column(column, overflow="fold")
        try:
            for record in records:
                table.add_row(*(table_cell(record.get(k)) for k in columns))
                count += 1
        finally:
            if count:  # no rows: the reason is on stderr, an empty frame above it says nothing
                Console(file=out, highlight=False, soft_wrap=False).print(table)
    return count


def _csv_cell(value: Any) -> Any:
    if isinstance(value, str):
        return encodable(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return "" if value is None else value


def table_cell(value: Any) -> Text:
    """A cell as literal text: control characters escaped, and brackets never read as rich markup."""
    if value is None:
        return Text("-")
    if isinstance(value, float):
        return Text(f"{value:.4f}")
    return Text(printable(str(value)))


def _summary_cell(value: Any) -> Text:
    """One value of a summary, for people: 461.53, not 461.5300 (record tables keep aligned decimals)."""
    if isinstance(value, float) and math.isfinite(value):
        return Text(f"{value:.4f}".rstrip("0").rstrip(".") or "0")
    return table_cell(value)


def key_value_table(pairs: Iterable[tuple[str, Any]], title: str | None = None) -> Table:
    table = Table(title=title, show_header=False, box=None, pad_edge=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in pairs:
        table.add_row(key, _summary_cell(value))
    return table


def flatten(document: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """{"a": {"b": 1}} -> ("a.b", 1); lists are shown inline."""
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from flatten(value, f"{name}.")
        elif isinstance(value, list) and len(value) > 12:
            yield name, f"[{len(value)} items]"
        else:
            yield name, value
