"""Task-run names an operator can read without identifying anyone.

``<stage>-<modality>[-<ROIs>]-<key tail>``, for example ``harmonise-CT-890675``: the modality
and ROI names say what the task works on, and the last characters of the series'
pseudonymous key (a keyed pseudonym, never a plain hash of an original UID) tell two series
apart on the run page.
"""

from __future__ import annotations

#: Characters of the pseudonymous key shown in task-run names.
KEY_TAIL = 6
#: Longest part (modality, ROI list) kept in a name.
PART_LENGTH = 32


def task_label(modality: str, key: str, *parts: str) -> str:
    """Return ``<modality>[-<parts>]-<key tail>`` for a task-run name.

    Parameters
    ----------
    modality
        Image modality (``CT``, ``MR``, ``PT``); ``?`` when unknown.
    key
        The series' pseudonymous key.
    *parts
        More to show, such as the ROI names (empty parts are left out).
    """
    shown = [p.strip().replace(" ", "_")[:PART_LENGTH] for p in (modality or "?", *parts) if p]
    return "-".join([*shown, key[-KEY_TAIL:]])
