"""Task-run names an operator can read without identifying anyone.

``<stage>-<modality>[-<ROIs>]-<key tail>``, for example ``harmonise-CT-890675``: the modality
and ROI names say what the task works on, and the last characters of the series'
pseudonymous key (a keyed pseudonym, never a plain hash of an original UID) tell two series
apart on the run page.

Small units that run several to a task (:class:`flows.stage.Grouping`) are named
``<stage>-<modalities>-x<count>-<key tail of the first unit>``, for example
``deid-CT-x12-3f9a2c`` or ``harmonise-CT+MR-x3-890675``.
"""

from __future__ import annotations

from collections.abc import Iterable

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


def group_label(members: Iterable[tuple[str, str]]) -> str:
    """Return ``<modalities>-x<count>-<key tail>`` for the task run of a group of units.

    Parameters
    ----------
    members
        ``(modality, pseudonymous key)`` of each unit of the group, in plan order.

    Returns
    -------
    str
        The group's modalities (sorted, ``+``-joined; ``?`` when unknown), how many units
        it holds and the key tail of its first unit, for example ``CT-x12-3f9a2c``.
    """
    members = list(members)
    if not members:
        return "?-x0"
    modalities = "+".join(sorted({m.strip() or "?" for m, _ in members}))
    return task_label(modalities, members[0][1], f"x{len(members)}")
