"""The site's read-only query endpoint (FastAPI)."""
