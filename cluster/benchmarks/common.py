"""Benchmark report helpers; they live in :mod:`pipelines.runinfo` (cluster builds on pipelines, not the reverse)."""

from pipelines.runinfo import git_commit, machine_info, write_report

__all__ = ["git_commit", "machine_info", "write_report"]
