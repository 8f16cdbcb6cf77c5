"""Print pdserve's requirements, one per line, for `pip install -r` in an image layer
that a source change does not invalidate: the base install plus the extras named,
with an extra that names another (`pdserve[kvstore]`) expanded.

    python requirements.py pyproject.toml [EXTRA ...]
"""

from __future__ import annotations

import re
import sys
import tomllib


def requirements(project: dict, extras: list[str]) -> list[str]:
    out = list(project["dependencies"])
    for extra in extras:
        for req in project["optional-dependencies"][extra]:
            if inner := re.fullmatch(rf"{project['name']}\[(.+)\]", req):
                out += [r for r in requirements(project, inner.group(1).split(",")) if r not in out]
            elif req not in out:
                out.append(req)
    return out


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as f:
        print("\n".join(requirements(tomllib.load(f)["project"], sys.argv[2:])))
