import subprocess
import sys

CODE = """
import warnings
warnings.simplefilter("default")
{imports}
from pydicom.dataset import Dataset
ds = Dataset()
ds.PatientAge = "Qzorvath-not-an-age"
"""


def _stderr(imports: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", CODE.format(imports=imports)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def test_pydicom_warnings_quote_values_unless_tasks_is_imported():
    assert "Qzorvath" in _stderr("")  # pydicom on its own prints the value
    assert "Qzorvath" not in _stderr("import tasks")
