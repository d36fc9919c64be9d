"""``python -m segexp.bench [NAME ...] [--quick] [-- options of NAME]``: run the benchmarks (speed
and memory targets live here, never in timed tests). Each module of this package with a ``main(argv)``
is one; options other than ``--quick`` (``--json``, ``--size``...) go to a single named benchmark."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time

import segexp.bench as package


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {available()})")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    argv = sys.argv[1:]
    own = argv.index("--") if "--" in argv else len(argv)  # after "--": the named benchmark's options only
    args, extra = parser.parse_known_args(argv[:own])
    extra += argv[own + 1 :]
    names = args.names or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {available()}")
    if extra and len(names) != 1:
        parser.error(f"options {extra} belong to one benchmark: name exactly one of {available()}")
    for name in names:
        module = importlib.import_module(f"segexp.bench.{name}")
        print(f"\n=== bench: {name} ===", flush=True)
        t0 = time.perf_counter()
        module.main((["--quick"] if args.quick else []) + extra)
        print(f"=== {name}: {time.perf_counter() - t0:.1f} s ===", flush=True)


if __name__ == "__main__":
    main()
