"""Ingest from a hospital PACS: DICOMweb pull (QIDO-RS + WADO-RS) and a C-STORE receiver.

Both land DICOM files in the site's private raw zone (``STORE/<site>/raw/...``) under opaque,
hashed names, then the normal ingest catalogues the raw zone, so PACS data feeds the same
catalogue and stages as a folder or S3 source.
"""
