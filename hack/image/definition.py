#!/usr/bin/env python3
"""Reads the image definition from the Dockerfile's final stage, for hack/image.sh: the Debian
packages it installs, the accounts it adds, its environment, user and entrypoint. The Dockerfile is the one place they
are written; this prints them as shell assignments."""
import json
import re
import shlex
import sys

# Comment lines may sit inside a continued instruction; Docker drops them before joining.
raw = [l for l in open(sys.argv[1]).read().splitlines() if not l.strip().startswith("#")]
text = "\n".join(raw).replace("\\\n", " ")
stage = text[text.rindex("\nFROM ") :]
lines = [l.strip() for l in stage.splitlines() if l.strip() and not l.strip().startswith("#")]

packages, env, accounts, user, entrypoint = [], [], [], None, None
for line in lines:
    word, _, rest = line.partition(" ")
    if word == "RUN":
        found = re.search(r"apt-get install (?:-\S+ )*((?:[a-z0-9][a-z0-9.+-]* ?)+)", rest)
        if found:
            packages += found.group(1).split()
        accounts += re.findall(r"\b(?:groupadd|useradd) [^&]*[^&\s]", rest)
    elif word == "ENV":
        env += [pair for pair in shlex.split(rest)]
    elif word == "USER":
        user = rest.strip()
    elif word == "ENTRYPOINT":
        entrypoint = json.loads(rest)

if not (packages and env and user and entrypoint):
    sys.exit(f"definition.py: no packages, ENV, USER or ENTRYPOINT in the final stage of {sys.argv[1]}")
print(f"IMAGE_PACKAGES=({' '.join(shlex.quote(p) for p in packages)})")
print(f"IMAGE_ENV=({' '.join(shlex.quote(e) for e in env)})")
print(f"IMAGE_ACCOUNTS=({' '.join(shlex.quote(a) for a in accounts)})")
print(f"IMAGE_USER={shlex.quote(user)}")
print(f"IMAGE_ENTRYPOINT={shlex.quote(json.dumps(entrypoint))}")
