"""The work: typed functions and per-series Prefect tasks, one subpackage per stage.

Importing this package (as every flow process and Dask worker does before running a task)
silences pydicom's warnings and log records: they quote header values, which may be
identifiers, and would otherwise reach terminals, worker logs and the Prefect UI.
"""

import logging
import warnings

warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")
logging.getLogger("pydicom").setLevel(logging.ERROR)
