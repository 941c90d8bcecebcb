#!/usr/bin/env python3
"""Fails when a source file includes a header from a layer its own layer may not use (harness/layers.txt).

Usage: ci/check-layering.py [--root DIR]   (DIR: a source tree, default the one holding this script)
Checks every .h/.cpp/.cu/.cuh under kernels/ and harness/<layer>/ (tests and benchmarks may include anything
but tests of a layer stay within it: kernels/tests may use only kernels). Exit 0 clean, 1 violations (each
printed as FILE:LINE: LAYER includes HEADER of LAYER), 2 a malformed layers file.
"""
import argparse
import pathlib
import re
import sys

INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')


def malformed(message):
    print(message, file=sys.stderr)
    sys.exit(2)


def read_layers(path):
    order, allowed = [], {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, deps = line.partition(":")
        name = name.strip()
        if not sep or not name:
            malformed(f"{path}:{number}: expected 'layer: deps...', got '{raw}'")
        deps = deps.split()
        for d in deps:
            if d not in allowed:
                malformed(f"{path}:{number}: layer '{name}' names '{d}', which is not a layer below it")
        order.append(name)
        allowed[name] = set(deps)
    return order, allowed


def layer_of_header(header, layers):
    parts = header.split("/")
    if parts[0] == "kernels":
        return "kernels"
    if parts[0] == "harness" and len(parts) > 2 and parts[1] in layers:
        return parts[1]
    return None  # system, generated (cpharness/version.h) or third-party headers


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=str(pathlib.Path(__file__).resolve().parent.parent))
    root = pathlib.Path(parser.parse_args().root)
    order, allowed = read_layers(root / "harness" / "layers.txt")
    dirs = {"kernels": root / "kernels"}
    for name in order:
        if name != "kernels":
            dirs[name] = root / "harness" / name
    violations, files = [], 0
    for layer, folder in dirs.items():
        for path in sorted(folder.rglob("*")):
            if path.suffix not in (".h", ".cpp", ".cu", ".cuh") or not path.is_file():
                continue
            files += 1
            for number, text in enumerate(path.read_text(errors="replace").splitlines(), 1):
                m = INCLUDE.match(text)
                if not m:
                    continue
                target = layer_of_header(m.group(1), allowed)
                if target and target != layer and target not in allowed[layer]:
                    violations.append(f"{path.relative_to(root)}:{number}: {layer} includes {m.group(1)} of layer "
                                      f"{target} (allowed: {' '.join(sorted(allowed[layer])) or 'none'})")
    for v in violations:
        print(v)
    print(f"check-layering: {files} files, {len(violations)} upward include(s)", file=sys.stderr)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
