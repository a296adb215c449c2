"""Create or update oncoflow's automations on a Prefect server, by name (safe to re-run).

Usage (from the repository root, with ``PREFECT_API_URL`` pointing at the server)::

    uv run python deployments/automations/apply.py            # every *.yaml in this folder
    uv run python deployments/automations/apply.py FILE.yaml  # some of them

The files use Prefect's automation format (what ``prefect automation create --from-file``
reads: ``name``, ``trigger``, ``actions``, ...) with one addition: an action may name its block
as ``block: <block-type-slug>/<block-name>`` instead of ``block_document_id``, since block ids
differ from one server to the next. An automation whose name already exists on the server is
updated in place, so applying the folder twice leaves one copy of each.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent


class AutomationFileError(Exception):
    """An automation file cannot be applied (one-line reason)."""


@dataclass(frozen=True)
class Applied:
    """One automation written to the server."""

    name: str
    id: str
    created: bool


def read_automation_file(path: Path) -> list[dict[str, Any]]:
    """Return the automations of a YAML file (one mapping, a list, or ``automations: [...]``)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise AutomationFileError(f"cannot read {path}: {exc}") from None
    if isinstance(data, dict) and "automations" in data:
        data = data["automations"]
    items = data if isinstance(data, list) else [data]
    if not all(isinstance(item, dict) and item.get("name") for item in items):
        raise AutomationFileError(f"{path}: every automation needs a name")
    return items


def resolve_blocks(spec: dict[str, Any], client: Any) -> dict[str, Any]:
    """Replace each action's ``block: <type-slug>/<name>`` by the block's ``block_document_id``."""
    from prefect.exceptions import ObjectNotFound

    actions = []
    for action in spec.get("actions", []):
        action = dict(action)
        ref = action.pop("block", None)
        if ref is not None:
            type_slug, _, name = str(ref).partition("/")
            if not (type_slug and name):
                raise AutomationFileError(f"{spec['name']}: block must be <type-slug>/<name>")
            try:
                document = client.read_block_document_by_name(name, type_slug)
            except ObjectNotFound:
                raise AutomationFileError(
                    f"{spec['name']}: block {ref} not found on the server; create it first"
                ) from None
            action["block_document_id"] = str(document.id)
        actions.append(action)
    return {**spec, "actions": actions}


def apply_automations(paths: list[Path], client: Any) -> list[Applied]:
    """Create the automations of ``paths``, or update those that exist by name.

    Parameters
    ----------
    paths
        Automation YAML files.
    client
        A synchronous Prefect client (``get_client(sync_client=True)``).

    Returns
    -------
    list of Applied
        One record per automation, in file order.
    """
    from prefect.events.schemas.automations import AutomationCore
    from pydantic import ValidationError

    applied = []
    for path in paths:
        for spec in read_automation_file(path):
            try:
                automation = AutomationCore.model_validate(resolve_blocks(spec, client))
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                where = ".".join(str(p) for p in first["loc"])
                raise AutomationFileError(f"{spec['name']}: {where}: {first['msg']}") from None
            existing = client.read_automations_by_name(automation.name)
            if existing:
                client.update_automation(existing[0].id, automation)
                applied.append(Applied(automation.name, str(existing[0].id), created=False))
            else:
                new_id = client.create_automation(automation)
                applied.append(Applied(automation.name, str(new_id), created=True))
    return applied


def main(argv: list[str] | None = None) -> int:
    """Apply automation files to the server of ``PREFECT_API_URL``; print one line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help="automation YAML files")
    args = parser.parse_args(argv)
    paths = args.files or sorted(HERE.glob("*.yaml"))
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            for item in apply_automations(paths, client):
                print(f"{'created' if item.created else 'updated'} {item.name} {item.id}")
    except AutomationFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
