"""The work: typed functions and per-series Prefect tasks, one subpackage per stage."""
