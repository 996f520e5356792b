"""Checks of RecBole atomic files (``.inter``, ``.item``, ``.user``) before RecBole parses them.

RecBole 1.2.1 reads atomic files with ``pandas.read_csv(engine="python")`` and then repairs what it finds: a
row with an extra field is dropped without a word, an empty or non-numeric float becomes the column mean (or a
bare ``Unable to convert`` error), a header without ``:type`` or a header-only file fails with a traceback
that names no file. :func:`check_dataset` reads each file once, as bytes, and stops at the first problem
with one line that names the file, the line, the field and the fix; rows RecBole would silently default
are counted and warned about once (or refused, for the time field that orders every sequence).

The atomic format has no quoting: every field is taken literally (a title ``"Great Performances" Cats`` is
that text, quotes included). :mod:`recbole_llmfuse.compat` makes RecBole's reader do the same
(``quoting=QUOTE_NONE``), and a UTF-8 byte-order mark is read past (``encoding: utf-8-sig``), with a note.

:func:`read_header` is the one parser of atomic headers in this package.
"""
from __future__ import annotations

import functools
import os
from logging import getLogger
from typing import Dict, List, Optional, Sequence, Tuple

from recbole_llmfuse.errors import AtomicFileError, ConfigError  # noqa: F401  (AtomicFileError re-exported)

#: the field types RecBole 1.2.1 knows (``recbole.utils.FeatureType``)
ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")
HEADER_EXAMPLE = "user_id:token<TAB>item_id:token<TAB>timestamp:float"


BOM = b"\xef\xbb\xbf"


def decode_line(raw: bytes, path: str, lineno: int, offset: int) -> str:
    """``raw`` (line ``lineno``, starting at byte ``offset`` of ``path``) as text; bytes that are not UTF-8
    raise :class:`AtomicFileError` naming the line and the byte offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = raw[err.start:err.start + 4]
        raise AtomicFileError(
            f"{path}, line {lineno}, byte offset {offset + err.start}: {bad!r} is not UTF-8; save the file as "
            f"UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`)") from None


def read_header(path: str) -> List[Tuple[str, str]]:
    """``[(name, type), ...]`` of an atomic file's header line (a UTF-8 BOM read past). Raises
    :class:`AtomicFileError` for an empty file, a field without ``:type``, an unknown type, a name given twice
    or bytes that are not UTF-8."""
    with open(path, "rb") as f:
        raw = f.readline()
    start = len(BOM) if raw.startswith(BOM) else 0
    line = decode_line(raw[start:], path, 1, start)
    if not line.strip():
        raise AtomicFileError(f"{path}: empty file; the first line must be a header such as '{HEADER_EXAMPLE}'")
    return parse_header(line.rstrip("\r\n").split("\t"), path)


def parse_header(fields: Sequence[str], path: str) -> List[Tuple[str, str]]:
    """``[(name, type), ...]`` of header fields already read from ``path`` (named in the error)."""
    out: List[Tuple[str, str]] = []
    for column, field in enumerate(fields, start=1):
        name, sep, kind = field.partition(":")
        if not sep or kind not in ATOMIC_TYPES or not name:
            raise AtomicFileError(
                f"{path}, line 1, column {column} {field!r}: a header field is name:type, type one of "
                f"{', '.join(ATOMIC_TYPES)} (e.g. '{HEADER_EXAMPLE}'); fix the header line")
        first = next((n for n, (other, _) in enumerate(out, start=1) if other == name), None)
        if first is not None:
            raise AtomicFileError(f"{path}, line 1: field name {name!r} appears twice (columns {first} and {column}); "
                                  f"rename one of them")
        out.append((name, kind))
    return out


def header_names(path: str, fields: Optional[Sequence[str]] = None) -> List[str]:
    """The field names of an atomic file's header (see :func:`read_header`); ``fields``: the header line's
    fields when the caller has read them already (the file is not opened again)."""
    return [name for name, _ in (read_header(path) if fields is None else parse_header(fields, path))]


def is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def check_atomic_file(path: str, time_field: Optional[str] = None) -> Dict[str, int]:
    """Check every row of one atomic file (see module docstring). Returns ``{"rows", "defaulted", "bom"}``:
    ``defaulted`` = rows with an empty float value RecBole will fill with the column mean (warned once);
    ``bom``: 1 when the file starts with a UTF-8 byte-order mark (read past, noted once). An empty
    ``time_field`` value, a wrong field count, a non-numeric float, bytes that are not UTF-8 and a file with
    no rows are errors. Values are literal: quotes are characters like any other."""
    fields = read_header(path)
    floats = [i for i, (_, kind) in enumerate(fields) if kind == "float"]
    seqs = [i for i, (_, kind) in enumerate(fields) if kind == "float_seq"]
    rows = defaulted = 0
    with open(path, "rb") as f:
        header = f.readline()
        offset = len(header)
        for lineno, raw in enumerate(f, start=2):
            line = decode_line(raw, path, lineno, offset).rstrip("\r\n")
            offset += len(raw)
            if not line:
                continue
            values = line.split("\t")
            if len(values) != len(fields):
                raise AtomicFileError(
                    f"{path}, line {lineno}: {len(values)} tab-separated fields, the header has {len(fields)} "
                    f"({', '.join(n for n, _ in fields)}); fix the line (a tab inside a text value splits it)")
            rows += 1
            empty = False
            for i in floats:
                value = values[i].strip()
                if not value:
                    if fields[i][0] == time_field:
                        raise AtomicFileError(
                            f"{path}, line {lineno}, field {time_field}: empty; RecBole would fill it with the "
                            f"column mean and reorder the sequence. Give every row its time, or drop the row")
                    empty = True
                elif not is_float(value):
                    raise AtomicFileError(f"{path}, line {lineno}, field {fields[i][0]}: {value!r} is not a number "
                                          f"(type float); fix the value or declare the field :token")
            for i in seqs:
                bad = next((v for v in values[i].split() if not is_float(v)), None)
                if bad is not None:
                    raise AtomicFileError(f"{path}, line {lineno}, field {fields[i][0]}: {bad!r} is not a number "
                                          f"(type float_seq: numbers separated by spaces); fix the value")
            defaulted += empty
    if not rows:
        raise AtomicFileError(f"{path}: a header and no rows; the file must hold at least one row under "
                              f"'{chr(9).join(n + ':' + k for n, k in fields)}'")
    return {"rows": rows, "defaulted": defaulted, "bom": int(header.startswith(BOM))}


@functools.lru_cache(maxsize=64)
def _checked(path: str, size: int, mtime: float, time_field: Optional[str]) -> Dict[str, int]:
    """:func:`check_atomic_file` once per file version; its warning comes with that one check."""
    counts = check_atomic_file(path, time_field)
    if counts["bom"]:
        getLogger().warning(f"{path}: starts with a UTF-8 byte-order mark (BOM); read without it")
    if counts["defaulted"]:
        getLogger().warning(f"{path}: {counts['defaulted']} of {counts['rows']} rows have an empty float value; "
                            f"RecBole fills it with the column mean")
    return counts


def check_dataset(folder: str, dataset: str, time_field: Optional[str] = None,
                  suffixes: Sequence[str] = ("inter", "item", "user")) -> Dict[str, Dict[str, int]]:
    """Check ``<folder>/<dataset>.<suffix>`` for each existing suffix (once per file version and process).
    Returns ``{suffix: {"rows", "defaulted"}}``; warns once per file about defaulted rows."""
    out = {}
    for suffix in suffixes:
        path = os.path.join(folder, f"{dataset}.{suffix}")
        if not os.path.isfile(path):
            continue
        stat = os.stat(path)
        out[suffix] = _checked(path, stat.st_size, stat.st_mtime, time_field if suffix == "inter" else None)
    return out
