"""Radiomics extraction with pyradiomics.

Validated parameters (``params``), per-(series, ROI) extraction (``extract``), a
content-addressed result cache in the store (``cache``) and the features table (``table``).
"""
