"""Reading a JSON object from a file we were pointed at (config.json, manifest.json, adapter_config.json).

Standard library only (the runtime imports this module). One rule: a file that is missing, unreadable,
not UTF-8, not JSON, or not a JSON object is one line of the caller's error type, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from octopus_rt.errors import InputError, OctopusError

__all__ = ["read_json_object"]


def read_json_object(path: str | Path, error: type[OctopusError] = InputError,
                     missing: str | None = None) -> dict[str, Any]:
    """The JSON object stored in `path`.

    `error` is raised (message: "cannot read PATH: reason" or "PATH does not hold a JSON object");
    `missing`, when given, is the message for a file that does not exist.
    """
    path = Path(path)
    if missing is not None and not path.is_file():
        raise error(missing)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{path} does not hold a JSON object")
    return data
