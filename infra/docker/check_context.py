#!/usr/bin/python3
"""Checks that the build stage of each Dockerfile copies a buildable workspace, without building
it (the rust:1-bookworm image cannot be assumed here): copies exactly what the stage's COPY
lines name (after .dockerignore) into a temporary directory, then runs
`cargo tree --locked --offline -p hub -p producers` there (every workspace member present,
Cargo.lock up to date) and checks that every file the sources embed with include_str! or
include_bytes! is there.

Usage: check_context.py DOCKERFILE... (from the repository root). Exits 1 naming what is missing.
"""
import fnmatch
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.getcwd()


def ignored(path, patterns):
    # .dockerignore semantics, simplified: the last matching pattern wins; "!" re-includes; a
    # pattern matches the path or one of its parent directories.
    result = False
    parts = path.split("/")
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.rstrip("/")
        if any(fnmatch.fnmatchcase("/".join(parts[:i]), p) for i in range(1, len(parts) + 1)):
            result = not neg
    return result


def main():
    patterns = [l.strip() for l in open(".dockerignore") if l.strip() and not l.startswith("#")]
    problems = []
    for dockerfile in sys.argv[1:]:
        lines = open(dockerfile).read().replace("\\\n", " ").splitlines()
        in_build, copies = False, []
        for line in lines:
            if line.startswith("FROM "):
                in_build = " AS build" in line
            elif in_build and line.startswith("COPY ") and "--from" not in line:
                args = line.split()[1:]
                copies.append((args[:-1], args[-1]))
        if not copies:
            problems.append(f"{dockerfile}: no COPY in a stage named build")
            continue
        ctx = tempfile.mkdtemp()
        try:
            for sources, dest in copies:
                for src in sources:
                    if not os.path.exists(src):
                        problems.append(f"{dockerfile}: COPY {src}: not in the repository")
                        continue
                    files = [src] if os.path.isfile(src) else [
                        os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(src) for f in fs]
                    for f in files:
                        if ignored(f, patterns):
                            continue
                        # dest "./" keeps the name; "dir/" puts files there; a directory source is
                        # copied to dest (its own name when dest names it).
                        if os.path.isfile(src):
                            target = os.path.join(dest, os.path.basename(f)) if dest.endswith("/") else dest
                        else:
                            target = os.path.join(dest, os.path.relpath(f, src))
                        target = os.path.join(ctx, target)
                        os.makedirs(os.path.dirname(target), exist_ok=True)
                        shutil.copy2(f, target)
            # The host's dependency tree of the two packages the images hold: it needs every
            # workspace member's manifest and an up-to-date Cargo.lock, and only crates that
            # `cargo build -p hub -p producers` has already fetched.
            r = subprocess.run(["cargo", "tree", "--locked", "--offline", "-e", "normal,build", "-p", "hub",
                                "-p", "producers", "--prefix", "none"], cwd=ctx, capture_output=True, text=True)
            if r.returncode != 0:
                problems.append(f"{dockerfile}: cargo tree --locked in the copied workspace: {r.stderr.strip()[-500:]}")
            for src in glob.glob(os.path.join(ctx, "**/*.rs"), recursive=True):
                for m in re.finditer(r'include_(?:str|bytes)!\("([^"]+)"\)', open(src).read()):
                    if not os.path.exists(os.path.join(os.path.dirname(src), m.group(1))):
                        problems.append(f"{dockerfile}: {os.path.relpath(src, ctx)} embeds {m.group(1)}, not copied")
        finally:
            shutil.rmtree(ctx)
    if problems:
        sys.exit("images check:\n  " + "\n  ".join(problems))
    print(f"images check: the build stages of {', '.join(sys.argv[1:])} copy a complete workspace")


main()
