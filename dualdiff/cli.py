"""The `dualdiff` command."""
from __future__ import annotations

import argparse
import json
import sys


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualdiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="report what was built and which backends are usable")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
