"""Non-DICOM cohorts: NIfTI and NRRD image/mask pairs from a cases CSV or a folder.

``cases`` lists the pairs (pyradiomics' batch CSV, or a folder by naming rule) into the private
catalogue ``catalog/volumes.parquet``; ``deid`` writes header-free copies under pseudonymous
keys in ``deid/volumes/`` and their rows in ``deid/series.parquet``, after which harmonise and
extract treat them like any other series.
"""
