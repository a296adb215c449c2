"""Cohorts: YAML specs, selection, Croissant manifests, atomic publication and verify."""
