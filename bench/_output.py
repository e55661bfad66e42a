"""The one way a ``bench/`` script hands back its result: printed as JSON (or the part of it
worth reading on a terminal) and written to ``--out`` when given."""

from __future__ import annotations

import json


def emit(result: dict, out: str | None, shown: dict | None = None) -> dict:
    """Print ``shown`` (default: ``result``) as indented JSON; write ``result`` to ``out``."""
    print(json.dumps(result if shown is None else shown, indent=2))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    return result
