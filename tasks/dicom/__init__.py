"""DICOM ingest: listing a source, parsing headers in batches, grouping series, the catalogue.

Modules
-------
listing
    fsspec listing of SOURCE (path, size, mtime or ETag) and the incremental diff against the
    catalogue; batches of files with content keys.
headers
    Header parsing without pixel data, detection of empty, truncated, non-DICOM and DICOMDIR
    files; the ``parse-dicom-batch`` task that writes a private part file per batch.
series
    Grouping instances into series and validating their geometry.
catalog
    Merging parts into ``catalog/instances.parquet`` and ``catalog/series.parquet``, the
    quarantine rows, and DuckDB views over the catalogue.
"""
