"""Harmonisation: de-identified DICOM series to verified volumes, masks, QC images and provenance.

Modules: :mod:`.config` (the settings), :mod:`.volume` (series to SimpleITK volume),
:mod:`.intensity` (HU, SUVbw, MR normalisation), :mod:`.masks` (RTSTRUCT, SEG, NIfTI to label
masks on the image grid), :mod:`.qc` (the QC picture), :mod:`.provenance` (steps as data) and
:mod:`.series` (the per-series task that chains them and writes to the site store).
"""
