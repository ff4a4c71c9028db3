"""Print ``cluster/runtime_env.yaml`` for the virtual environment this command runs from.

``ray job submit`` runs the job's entrypoint with the PATH of the process that started Ray on the head node, so a
cluster started from a venv that was never activated runs ``python`` from the system (see the comment in
``cluster/runtime_env.yaml``). This command writes the same runtime environment with the PATH entry pointing at
the venv of the interpreter running it — right for nodes that share this machine's layout (one machine, a shared
file system, or an image built with the venv at the same path).

Usage::

    python -m cluster.runtime_env                      # print to stdout
    python -m cluster.runtime_env --out my_env.yaml    # write a file for --runtime-env
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

TEMPLATE = Path(__file__).with_name("runtime_env.yaml")
PATH_SUFFIX = ":${PATH}"


def runtime_env(venv: Path | None = None, template: Path = TEMPLATE) -> dict[str, Any]:
    """The runtime environment of ``template`` with ``venv``'s ``bin`` first on the entrypoint's PATH.

    Args:
        venv: the environment's root (``sys.prefix`` of the Python that has the project installed); default the
            running interpreter's.
        template: the runtime-environment YAML to start from.

    Returns:
        A mapping for ``ray job submit --runtime-env`` / ``ray.init(runtime_env=...)``: ``working_dir``,
        ``excludes`` and ``env_vars`` with ``PATH`` = ``<venv>/bin:${PATH}`` (Ray expands ``${PATH}`` on the node).
    """
    env = yaml.safe_load(template.read_text(encoding="utf-8"))
    root = Path(sys.prefix if venv is None else venv).resolve()
    env.setdefault("env_vars", {})["PATH"] = f"{root / 'bin'}{PATH_SUFFIX}"
    return env


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: write the runtime environment as YAML to ``--out`` or stdout."""
    parser = argparse.ArgumentParser(prog="python -m cluster.runtime_env", description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=None, help="environment root (default: this interpreter's)")
    parser.add_argument("--out", type=Path, default=None, help="file to write (default: stdout)")
    args = parser.parse_args(argv)
    if args.venv is not None and not (args.venv / "bin" / "python").exists():
        parser.error(f"--venv {args.venv}: no bin/python there; give the root of a Python environment")
    text = yaml.safe_dump(runtime_env(args.venv), sort_keys=False)
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
