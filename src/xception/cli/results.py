"""How the commands that take many image files report them: one line per file, errors on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import InvalidArgumentError


def report_file_results(results: list[dict[str, Any]], inputs: Sequence[Any], *, as_json: bool,
                        describe: Callable[[dict[str, Any]], str]) -> int:
    """Print each file's result (``describe`` of it, or the whole dict as JSON); an unreadable file's error goes
    to stderr and makes the exit code 1, the other files are still reported."""
    if not results:
        raise InvalidArgumentError(f"no images found in {' '.join(map(str, inputs))}")
    for result in results:
        if as_json:
            print(json.dumps(result))
        elif "error" in result:
            print(f"{result['file']}: error: {result['error']}", file=sys.stderr)
        else:
            print(f"{result['file']}: {describe(result)}")
    return 1 if any("error" in result for result in results) else 0
