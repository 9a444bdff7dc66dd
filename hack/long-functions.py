#!/usr/bin/env python3
"""Lists every function in src/ longer than LIMIT lines (default 60), outside #[cfg(test)]
items, longest first. A function whose line before `fn` is a `// ...` comment saying why it is
clearer whole is marked [kept]. Brace counting is rough (strings and comments are stripped
line by line), which is enough for rustfmt-formatted code.

Usage: hack/long-functions.py [LIMIT]
"""
import os
import re
import sys

LIMIT = int(sys.argv[1]) if len(sys.argv) > 1 else 60
FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)")


def code(line):
    line = re.sub(r"//.*", "", line)
    line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
    return re.sub(r"'(\\.|[^'\\])'", "''", line)


def item_end(lines, i):
    """The last line of the item starting at line i (its closing brace, or its `;`)."""
    depth, started = 0, False
    for j in range(i, len(lines)):
        t = code(lines[j])
        if not started and depth == 0 and t.strip().endswith(";") and "{" not in t:
            return j, False
        depth += t.count("{") - t.count("}")
        started = started or "{" in t
        if started and depth <= 0:
            return j, True
    return len(lines) - 1, started


found = []
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
for folder, _, files in os.walk(root):
    for f in files:
        if not f.endswith(".rs"):
            continue
        path = os.path.join(folder, f)
        lines = open(path, encoding="utf-8").read().split("\n")
        i = 0
        while i < len(lines):
            if lines[i].strip().startswith("#[cfg(test)]"):
                i = item_end(lines, i + 1)[0] + 1
                continue
            m = FN.match(lines[i])
            if m:
                end, body = item_end(lines, i)
                n = end - i + 1
                if body and n > LIMIT:
                    prev = lines[i - 1].strip() if i else ""
                    kept = prev.startswith("// ") and "whole" in prev
                    rel = os.path.relpath(path, os.path.join(root, ".."))
                    found.append((n, f"{rel}:{i + 1}", m.group(6), kept))
            i += 1
for n, where, name, kept in sorted(found, reverse=True):
    print(f"{n:4d} {where} {name}{'  [kept]' if kept else ''}")
