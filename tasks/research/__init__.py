"""What researchers need around the pipeline: methods-section provenance, exports, own data."""
