"""Golden outputs of every editor and of the batch job (recorded in ``golden_values.json`` by ``tests/golden.py``).

A refactor must leave these numbers as they are. A change that alters them on purpose re-records them
(``python tests/golden.py --record CASE``) in the same commit and says why.
"""

from __future__ import annotations

import json

import golden
import pytest
import torch


@pytest.fixture(scope="module")
def recorded() -> dict:
    return golden.load_values()


def test_every_case_is_recorded(recorded: dict) -> None:
    assert sorted(recorded) == sorted(golden.CASES)


@pytest.mark.parametrize("name", list(golden.CASES))
def test_golden(name: str, recorded: dict) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as recorded; the values do not depend on it beyond the tolerance
    try:
        actual = json.loads(json.dumps(golden.CASES[name]()))
    finally:
        torch.set_num_threads(threads)
    diffs = golden.compare(recorded[name], actual)
    assert not diffs, f"{name} changed:\n" + "\n".join(diffs)


def test_compare_catches_differences() -> None:
    expected = {"a": [0.5, 0.25], "bits": "ff00", "n": 3}
    assert golden.compare(expected, {"a": [0.5, 0.25 + golden.ATOL / 2], "bits": "ff00", "n": 3}) == []
    assert golden.compare(expected, {"a": [0.5, 0.26], "bits": "ff00", "n": 3})
    assert golden.compare(expected, {"a": [0.5, 0.25], "bits": "ff01", "n": 3})
    assert golden.compare(expected, {"a": [0.5], "bits": "ff00", "n": 3})
    assert golden.compare(expected, {"a": [0.5, 0.25], "bits": "ff00"})
