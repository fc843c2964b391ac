"""The hostile catalog (mathtir/sandbox/catalog.py) against a real bwrap pool: every case contained.

The catalog runs once, spread over two workers, in a module fixture; each case is then its own test.
"""

from __future__ import annotations

import pytest

from mathtir.sandbox import STATUSES, SandboxPool
from mathtir.sandbox.catalog import CATALOG, HostBait, run_catalog


@pytest.fixture(scope="module")
def reports():
    bait = HostBait()  # planted before the pool starts, so the workers' parent holds the secret
    try:
        with SandboxPool(2, memory_mb=256) as pool:
            assert not pool.degraded
            yield {r.case.name: r for r in run_catalog(pool.workers, bait)}
    finally:
        bait.close()


def test_catalog_is_large_names_are_unique_and_statuses_exist():
    assert len(CATALOG) >= 100
    assert len({case.name for case in CATALOG}) == len(CATALOG)
    assert {status for case in CATALOG for status in case.expect} <= set(STATUSES)


@pytest.mark.parametrize("name", [case.name for case in CATALOG])
def test_hostile_case_is_contained(reports, name):
    report = reports[name]
    assert report.problems == [], f"{name}: {report.problems}"
