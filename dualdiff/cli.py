"""The `dualdiff` command."""
from __future__ import annotations

import argparse
import json
import sys
import warnings


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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``dualdiff: error: ...`` and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        sub = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(2, f"dualdiff: error: {sub}{message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dualdiff", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback on errors (or set DUALDIFF_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="report what was built and which backends are usable")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    info.set_defaults(func=_info)
    check = sub.add_parser("ops-check", help="run every fused op on every usable backend against its reference, timed")
    check.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda (default: cuda if available)")
    check.add_argument("--iters", type=int, default=10, help="timed repetitions per backend")
    check.add_argument("--json", action="store_true", help="print the rows as JSON")
    check.set_defaults(func=_ops_check)

    from dualdiff.cli_ldm import register_ldm_commands
    from dualdiff.cli_lift import register_lift_commands
    from dualdiff.cli_tadiff import register_tadiff_commands
    from dualdiff.cli_toy2d import register_toy2d_commands
    from dualdiff.cli_vae import register_vae_commands

    for register in (register_lift_commands, register_toy2d_commands, register_tadiff_commands,
                     register_vae_commands, register_ldm_commands):
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; a user error prints one ``dualdiff: error: ...`` line and returns 2."""
    from dualdiff.cli_common import debug_enabled
    from dualdiff.errors import user_error_types

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after an option (``preset=tiny --out-dir X train.steps=3``):
    # argparse stops filling the ``overrides`` positional at the first option, so gather the rest
    stray = [tok for tok in extra if tok.startswith("-") or "=" not in tok]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides or []) + extra
    # recent torch (2.14 here) warns on its own first forward-mode jvp (torch._decomp.decompositions_for_jvp
    # scripts its decompositions): nothing the user can act on, so the CLI does not print it
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning,
                            module=r"torch\.jit\._script")
    if debug_enabled(args):
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except user_error_types() as e:  # the one library-error -> CLI mapping (dualdiff/errors.py)
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"dualdiff: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dualdiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
