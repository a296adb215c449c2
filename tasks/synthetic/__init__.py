"""Synthetic multi-site DICOM cohort with planted identifiers, faults and an answer key.

>>> from tasks.synthetic import generate_cohort, CohortTruth
>>> truth = generate_cohort("/tmp/cohort", sites=3, patients=3, seed=0)  # doctest: +SKIP
"""

from tasks.synthetic.cohort import generate_cohort
from tasks.synthetic.truth import CohortTruth

__all__ = ["CohortTruth", "generate_cohort"]
