"""Print one of the README's two fresh-machine commands: ``run`` or ``test``.

The README marks them with ``<!-- command: run -->`` and ``<!-- command: test -->`` before a
fenced block holding a single line; CI and the tests run exactly that line.
"""

import pathlib
import re
import sys

text = pathlib.Path(__file__).resolve().parent.parent.joinpath("README.md").read_text()
which = sys.argv[1]
match = re.search(rf"<!-- command: {which} -->\s*```(?:bash|sh)?\n(.+?)\n```", text)
if not match:
    sys.exit(f"README.md has no '<!-- command: {which} -->' block")
print(match.group(1).strip())
