"""What every benchmark and bench report records next to its numbers: machine, commit, versions, parameters
(:mod:`instdiff.runinfo` reads the commit and the machine; this module writes the JSON report)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from instdiff.runinfo import git_commit, machine_info


def write_report(path: str | Path, params: dict[str, Any], results: Any, **extra: Any) -> Path:
    """Write ``{"machine", "commit", "created", "params", "results", ...}`` as JSON; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "machine": machine_info(),
        "commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "params": params,
        "results": results,
        **extra,
    }
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


__all__ = ["git_commit", "machine_info", "write_report"]
