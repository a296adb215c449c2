"""Deterministic UIDs in objects highdicom builds (it draws some UIDs at random)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: Prefix of the UIDs highdicom generates.
HIGHDICOM_UID_ROOT = "1.2.826.0.1.3680043.10.511."


def replace_generated_uids(ds: Any, make: Callable[[int], str]) -> None:
    """Replace every UID highdicom drew at random, at any depth, by ``make(n)``.

    The n-th distinct random UID met becomes ``make(n)``; a UID met again gets the same
    replacement, so references inside the object stay consistent.
    """
    mapping: dict[str, str] = {}

    def visit(dataset: Any) -> None:
        for elem in dataset:
            if elem.VR == "SQ":
                for item in elem.value:
                    visit(item)
            elif (
                elem.VR == "UI"
                and isinstance(elem.value, str)
                and elem.value.startswith(HIGHDICOM_UID_ROOT)
            ):
                if elem.value not in mapping:
                    mapping[elem.value] = make(len(mapping))
                elem.value = mapping[elem.value]

    visit(ds)
