"""mathtir sandbox selftest [--workers N] [--allow-degraded] [--only NAME,NAME...]

Runs the hostile catalog (mathtir/sandbox/catalog.py) against a real pool and prints one row per case.
Exit status 0 only if every case was contained.
"""

from __future__ import annotations

import argparse
import sys
import time

from mathtir.sandbox.catalog import CATALOG, HostBait, run_catalog
from mathtir.sandbox.pool import SandboxPool


def selftest(workers: int, allow_degraded: bool, only: list[str] | None = None) -> int:
    cases = CATALOG if not only else tuple(case for case in CATALOG if case.name in only)
    unknown = set(only or ()) - {case.name for case in CATALOG}
    if unknown:
        print(f"unknown cases: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    bait = HostBait()  # before the pool: the workers start from a process holding the planted secret
    try:
        t0 = time.monotonic()
        with SandboxPool(workers, allow_degraded=allow_degraded) as pool:
            mode = "DEGRADED (rlimits + seccomp only)" if pool.degraded else "bwrap + seccomp + rlimits"
            print(f"mathtir sandbox selftest: {len(cases)} hostile cases on {workers} workers, {mode}")
            reports = run_catalog(pool.workers, bait, cases)
    finally:
        bait.close()
    width = max(len(case.name) for case in cases)
    print(f"{'case':<{width}}  {'expected':<14} {'got':<14} {'ms':>6}  verdict")
    for r in reports:
        verdict = "contained" if r.contained else "NOT CONTAINED: " + "; ".join(r.problems)
        print(f"{r.case.name:<{width}}  {'/'.join(r.case.expect):<14} {r.result.status:<14} "
              f"{r.seconds * 1000:>6.0f}  {verdict}")
    failed = [r for r in reports if not r.contained]
    print(f"{len(reports) - len(failed)}/{len(reports)} contained in {time.monotonic() - t0:.1f} s"
          + ("" if not failed else f"; FAILED: {', '.join(r.case.name for r in failed)}"))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mathtir sandbox", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("selftest", help="run the hostile catalog and print a table")
    st.add_argument("--workers", type=int, default=2)
    st.add_argument("--allow-degraded", action="store_true",
                    help="run even without bwrap/user namespaces (rlimits + seccomp only)")
    st.add_argument("--only", help="comma-separated case names: run just these")
    args = parser.parse_args(argv)
    return selftest(args.workers, args.allow_degraded, args.only.split(",") if args.only else None)

