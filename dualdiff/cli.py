"""The `dualdiff` command."""
from __future__ import annotations

import argparse
import json
import sys


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _info(args: argparse.Namespace) -> int:
    from dualdiff import backends

    report = backends()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    ext = report["extension"]
    print(f"dualdiff._C built: {ext['built']}  cuda kernels: {ext['cuda_kernels']}"
          f" ({ext['cuda_archs'] or '-'})  openmp: {ext['openmp']}")
    if ext["error"]:
        print(f"  error: {ext['error']}")
    t = report["torch"]
    print(f"torch {t['version']}  cuda available: {t['cuda_available']}")
    print(f"DUALDIFF_BACKEND={report['forced']['DUALDIFF_BACKEND']}")
    for device_type in ("cpu", "cuda"):
        print(f"{device_type}:")
        for name, st in report[device_type].items():
            print(f"  {name:7s} {'yes' if st['usable'] else 'no ':3s}  {st['why']}")
    return 0


def _ops_check(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from dualdiff.ops_check import format_rows, run_checks

    rows = run_checks(args.device, iters=args.iters)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(format_rows(rows))
    bad = [r for r in rows if not r.ok]
    if bad:
        print(f"{len(bad)} op/backend pairs disagree with the reference", file=sys.stderr)
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="report what was built and which backends are usable")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    info.set_defaults(func=_info)
    check = sub.add_parser("ops-check", help="run every fused op on every usable backend against its reference, timed")
    check.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda (default: cuda if available)")
    check.add_argument("--iters", type=int, default=10, help="timed repetitions per backend")
    check.add_argument("--json", action="store_true", help="print the rows as JSON")
    check.set_defaults(func=_ops_check)

    from dualdiff.cli_lift import register_lift_commands
    from dualdiff.cli_toy2d import register_toy2d_commands

    register_lift_commands(sub)
    register_toy2d_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
