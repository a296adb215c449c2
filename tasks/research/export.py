"""``oncoflow export``: a site's features table as one flat file with its methods text.

CSV: the methods paragraph (settings, versions, harmonisation steps) comes first as ``# ``
comment lines, then the table (one row per (series, ROI), status columns included)::

    pandas.read_csv("features.csv", comment="#")
    duckdb.sql("SELECT * FROM read_csv('features.csv', comment='#', header=true)")
    grep '^# ' features.csv | cut -c3-        # the paragraph, ready to paste

Parquet: the table with every ``oncoflow.*`` metadata entry plus ``oncoflow.methods_text``.
"""

from __future__ import annotations

import io
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from tasks.errors import OncoflowError
from tasks.radiomics.ibsi import FEATURE_COLUMN
from tasks.research.methods import methods_text, read_methods
from tasks.store import FEATURES, SiteStore
from tasks.store_checks import missing_input

#: A features table key (not its diagnostics or robustness side tables).
TABLE_KEY = re.compile(rf"^{FEATURES}/(?P<hash>[0-9a-f]{{64}})\.parquet$")

ExportFormat = Literal["csv", "parquet"]


@dataclass(frozen=True)
class ExportResult:
    """What ``oncoflow export`` wrote."""

    out: str
    format: str
    params_hash: str
    rows: int
    feature_columns: int

    def to_dict(self) -> dict[str, object]:
        """Return the result as a plain dict (CLI summary)."""
        return asdict(self)


def feature_tables(store: SiteStore) -> list[str]:
    """Return the store keys of the site's features tables, sorted."""
    return [k for k in store.children(FEATURES) if TABLE_KEY.match(k)]


def choose_table(store: SiteStore, params: str | None) -> str:
    """Return the features table to export: by preset, parameter file or hash, or the only one.

    Raises
    ------
    OncoflowError
        When the site has no features table, or several and ``params`` does not pick one.
    """
    tables = feature_tables(store)
    if not tables:
        if not store.exists(""):
            raise missing_input(store, "features table", "oncoflow extract")
        raise OncoflowError(
            f"site {store.site!r} has no features table: run `oncoflow extract` first"
        )
    if params is None:
        if len(tables) > 1:
            hashes = ", ".join(TABLE_KEY.match(k)["hash"][:12] for k in tables)  # type: ignore[index]
            raise OncoflowError(
                f"site {store.site!r} has {len(tables)} features tables (params hashes {hashes}): "
                "choose one with --params PRESET|FILE|HASH"
            )
        return tables[0]
    if re.fullmatch(r"[0-9a-f]{6,63}", params):  # a params-hash prefix
        found = [k for k in tables if TABLE_KEY.match(k)["hash"].startswith(params)]  # type: ignore[index]
        if len(found) == 1:
            return found[0]
    from tasks.cohort.select import resolve_feature_table

    return resolve_feature_table(store, params)


def _csv_bytes(table: pa.Table, text: str) -> bytes:
    flat = table.select(
        [n for n in table.column_names if not pa.types.is_nested(table.schema.field(n).type)]
    )
    sink = io.BytesIO()
    pacsv.write_csv(flat.replace_schema_metadata(None), sink)
    header = "".join(f"# {line}\n" if line else "#\n" for line in text.splitlines())
    return header.encode("utf-8") + sink.getvalue()


def export_features(
    store: SiteStore, out: str | Path, params: str | None = None, fmt: ExportFormat = "csv"
) -> ExportResult:
    """Write the site's features table and its methods text to ``out``.

    Parameters
    ----------
    store
        The site store.
    out
        Output file (local path); its folder must exist.
    params
        Preset, parameter file or params hash of the table (None: the site's only table).
    fmt
        ``csv`` (methods as ``#`` lines, then the table) or ``parquet`` (metadata).

    Returns
    -------
    ExportResult
        Output path, format, params hash and counts.
    """
    key = choose_table(store, params)
    table = store.read_table(key)
    assert table is not None
    meta = read_methods(table.schema.metadata)
    text = (
        f"oncoflow features export: site {store.site}, table {key}\n"
        + methods_text(meta, table)
        + "\nRead with: pandas.read_csv(path, comment='#')"
    )
    target = Path(out)
    if not target.parent.exists():
        raise OncoflowError(f"output folder {target.parent} does not exist")
    if fmt == "csv":
        data = _csv_bytes(table, text)
    elif fmt == "parquet":
        sink = io.BytesIO()
        metadata = {**(table.schema.metadata or {}), b"oncoflow.methods_text": text.encode()}
        pq.write_table(table.replace_schema_metadata(metadata), sink, compression="zstd")
        data = sink.getvalue()
    else:
        raise OncoflowError(f"--format {fmt}: use csv or parquet")
    target.write_bytes(data)
    features = [c for c in table.column_names if FEATURE_COLUMN.match(c)]
    return ExportResult(
        out=str(target),
        format=fmt,
        params_hash=TABLE_KEY.match(key)["hash"],  # type: ignore[index]
        rows=table.num_rows,
        feature_columns=len(features),
    )
