"""Create or update oncoflow's automations on a Prefect server, by name (safe to re-run).

Usage (from the repository root, with ``PREFECT_API_URL`` pointing at the server)::

    uv run python deployments/automations/apply.py            # every *.yaml in this folder
    uv run python deployments/automations/apply.py FILE.yaml  # some of them

The files use Prefect's automation format (what ``prefect automation create --from-file``
reads: ``name``, ``trigger``, ``actions``, ...) with one addition: an action may name its block
as ``block: <block-type-slug>/<block-name>`` instead of ``block_document_id``, since block ids
differ from one server to the next. An automation whose name already exists on the server is
updated in place, so applying the folder twice leaves one copy of each.

All or nothing: every file is read, every referenced block looked up and every automation
validated before the first one is written; a missing block or an invalid file writes nothing
and the error names every missing block. ``--blocks`` lists the blocks the files need.
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


def block_refs(specs: list[dict[str, Any]]) -> list[str]:
    """Return the ``<type-slug>/<name>`` blocks the automations' actions name, sorted."""
    refs = set()
    for spec in specs:
        for action in spec.get("actions", []):
            ref = action.get("block")
            if ref is not None:
                type_slug, _, name = str(ref).partition("/")
                if not (type_slug and name):
                    raise AutomationFileError(f"{spec['name']}: block must be <type-slug>/<name>")
                refs.add(str(ref))
    return sorted(refs)


def find_blocks(refs: list[str], client: Any) -> dict[str, str]:
    """Look every block up on the server; return ``{ref: block_document_id}``.

    Raises
    ------
    AutomationFileError
        Naming every block that is missing, so they can all be created before trying again.
    """
    from prefect.exceptions import ObjectNotFound

    found, missing = {}, []
    for ref in refs:
        type_slug, _, name = ref.partition("/")
        try:
            found[ref] = str(client.read_block_document_by_name(name, type_slug).id)
        except ObjectNotFound:
            missing.append(ref)
    if missing:
        raise AutomationFileError(
            f"block(s) not found on the server: {', '.join(missing)}; create them first "
            "(docs/operations.md, Automations); nothing was applied"
        )
    return found


def resolve_blocks(spec: dict[str, Any], blocks: dict[str, str]) -> dict[str, Any]:
    """Replace each action's ``block: <type-slug>/<name>`` by the block's ``block_document_id``."""
    actions = []
    for action in spec.get("actions", []):
        action = dict(action)
        ref = action.pop("block", None)
        if ref is not None:
            action["block_document_id"] = blocks[str(ref)]
        actions.append(action)
    return {**spec, "actions": actions}


def read_all(paths: list[Path]) -> list[dict[str, Any]]:
    """Read every automation of ``paths``; names must be unique across the files."""
    specs = [spec for path in paths for spec in read_automation_file(path)]
    names = [spec["name"] for spec in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise AutomationFileError(f"automation name used twice: {', '.join(twice)}")
    return specs


def apply_automations(paths: list[Path], client: Any) -> list[Applied]:
    """Create the automations of ``paths``, or update those that exist by name.

    Every automation is validated and every block resolved before anything is written.

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

    Raises
    ------
    AutomationFileError
        When a file is invalid or a block is missing (then nothing was written).
    """
    from prefect.events.schemas.automations import AutomationCore
    from pydantic import ValidationError

    specs = read_all(paths)
    blocks = find_blocks(block_refs(specs), client)
    automations = []
    for spec in specs:
        try:
            automations.append(AutomationCore.model_validate(resolve_blocks(spec, blocks)))
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise AutomationFileError(f"{spec['name']}: {where}: {first['msg']}") from None
    applied = []
    for automation in automations:
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
    parser.add_argument("--blocks", action="store_true", help="list the blocks the files need")
    args = parser.parse_args(argv)
    paths = args.files or sorted(HERE.glob("*.yaml"))
    try:
        if args.blocks:
            for ref in block_refs(read_all(paths)):
                print(ref)
            return 0
    except AutomationFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
