"""Whether this interpreter has every package of a lock file (``name==version`` lines) at its locked version.

    python tests/check_lock.py requirements-lock.txt                 # the versions; exit 1 on any difference
    python tests/check_lock.py requirements-lock.txt --quiet         # exit status only
    python tests/check_lock.py requirements-lock.txt --differences   # only what differs
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata

SHOWN = ("transformers", "accelerate", "huggingface-hub", "datasets", "tokenizers", "deepspeed", "numpy")


def locked(path: str) -> dict[str, str]:
    pins = {}
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, sep, version = line.partition("==")
                if not sep:
                    raise SystemExit(f"{path}: {line!r} is not a name==version pin")
                pins[normal(name)] = version.strip()
    return pins


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def differences(pins: dict[str, str]) -> list[str]:
    out = []
    for name, version in sorted(pins.items()):
        try:
            here = metadata.version(name)
        except metadata.PackageNotFoundError:
            here = "not installed"
        if here != version:
            out.append(f"{name}: locked {version}, here {here}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lock_file")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--differences", action="store_true")
    args = parser.parse_args(argv)
    pins = locked(args.lock_file)
    diff = differences(pins)
    if not args.quiet:
        for line in diff:
            print(line)
        if not args.differences:
            shown = ", ".join(f"{n} {pins[n]}" for n in SHOWN if n in pins)
            print(f"{args.lock_file}: {len(pins) - len(diff)} of {len(pins)} packages at their locked version "
                  f"({shown})")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
