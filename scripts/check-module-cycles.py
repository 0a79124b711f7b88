#!/usr/bin/env python3
"""Fails when a module of a crate uses a module that uses it back (a cycle of any length
between the top-level modules of one crate). Test modules (`#[cfg(test)] mod ...`) and
comments are ignored. Usage: scripts/check-module-cycles.py [ROOT]"""
import pathlib
import re
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".")
# Cycles known and left for later, each with why: keep this list short.
ALLOWED = set()


def code_of(path):
    text = path.read_text()
    # A test module comes last in our files: everything from it on is test code.
    test_module = re.search(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text)
    if test_module:
        text = text[: test_module.start()]
    return re.sub(r"//[^\n]*", "", text)


failed = False
for src in sorted(list(root.glob("crates/*/src")) + list(root.glob("apps/*/src"))):
    crate = src.parent.name
    modules = {}
    for path in src.iterdir():
        if path.suffix == ".rs" and path.stem not in ("lib", "main"):
            modules[path.stem] = [path]
        elif path.is_dir():
            modules[path.name] = list(path.rglob("*.rs"))
    edges = {m: set() for m in modules}
    for name, files in modules.items():
        code = "".join(code_of(f) for f in files)
        for other in modules:
            if other == name:
                continue
            # `crate::other`, or `other` in a `use crate::{...}` list.
            if re.search(rf"crate::{other}\b", code) or re.search(
                rf"use crate::\{{[^}}]*\b{other}\b[^}}]*\}}", code
            ):
                edges[name].add(other)
    # Strongly connected components (Tarjan).
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    for comp in comps:
        if (crate, frozenset(comp)) in ALLOWED:
            print(f"{crate}: known cycle {sorted(comp)} (allowed, see the list)")
            continue
        failed = True
        detail = "; ".join(f"{a} -> {', '.join(sorted(edges[a] & comp))}" for a in sorted(comp))
        print(f"{crate}: modules use each other: {detail}")
sys.exit(1 if failed else 0)
