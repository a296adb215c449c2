"""Prefect flows: what runs, in what order, on which task runner; and the CLI."""
