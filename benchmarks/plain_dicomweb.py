"""The ceiling of ``benchmarks/pacs.py``: a plain dicomweb-client pull of every N-th series.

Imports only dicomweb-client, requests and pydicom (no oncoflow, no Prefect), so a freshly
started process costs what a plain script costs. Credentials come from
``ONCOFLOW_DICOMWEB_USER`` / ``ONCOFLOW_DICOMWEB_PASSWORD``.

Usage::

    python benchmarks/plain_dicomweb.py DICOMWEB_URL OUT_DIR PART PARTS
"""

from __future__ import annotations

import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import requests
from dicomweb_client import DICOMwebClient


def plain_half(dicomweb: str, out: str, part: int, parts: int) -> dict[str, float]:
    """Search every study's series and pull every ``parts``-th one from ``part`` on.

    Each instance is retrieved in the stored transfer syntax and written with pydicom.

    Returns
    -------
    dict
        Instances written, seconds of the search and of the pulls.
    """
    t0 = time.perf_counter()
    with requests.Session() as session:
        env = os.environ
        session.auth = (env["ONCOFLOW_DICOMWEB_USER"], env["ONCOFLOW_DICOMWEB_PASSWORD"])
        client = DICOMwebClient(url=dicomweb, session=session)
        client.set_http_retry_params(retry=False)
        studies = [s["0020000D"]["Value"][0] for s in client.search_for_studies()]
        with ThreadPoolExecutor(8) as pool:
            listed = pool.map(lambda u: client.search_for_series(study_instance_uid=u), studies)
            series = sorted(
                (study, item["0020000E"]["Value"][0])
                for study, found in zip(studies, listed, strict=True)
                for item in found
            )
        t1 = time.perf_counter()
        n = 0
        for study, uid in series[part::parts]:
            for ds in client.retrieve_series(study, uid, media_types=(("application/dicom", "*"),)):
                buf = io.BytesIO()
                pydicom.dcmwrite(buf, ds, enforce_file_format=True)
                (Path(out) / f"{ds.SOPInstanceUID}.dcm").write_bytes(buf.getvalue())
                n += 1
    return {"instances": n, "search": t1 - t0, "transfer": time.perf_counter() - t1}


if __name__ == "__main__":
    url, folder, index, count = sys.argv[1:5]
    plain_half(url, folder, int(index), int(count))
