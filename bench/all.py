"""``make bench``: run every registered benchmark (``dwcp bench NAME --json``) in turn and
print one JSON object ``{name: figures}``. A benchmark that fails is reported with its
exit status and the tail of its error output, and makes this exit non-zero."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from importlib.metadata import entry_points


def main() -> int:
    names = sorted(ep.name for ep in entry_points(group="dwcp.benches"))
    results: dict[str, object] = {}
    failed = False
    for name in names:
        print(f"bench {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "federation", "bench", name, "--json"],
            capture_output=True,
            text=True,
        )
        took = time.perf_counter() - started
        if proc.returncode != 0:
            failed = True
            results[name] = {"error": proc.returncode, "stderr": proc.stderr[-2000:]}
            print(f"bench {name} failed after {took:.1f} s", file=sys.stderr)
            continue
        try:
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            failed = True
            results[name] = {"error": "no JSON object on stdout", "stdout": proc.stdout[-2000:]}
        print(f"bench {name} done in {took:.1f} s", file=sys.stderr)
    print(json.dumps(results, indent=2, sort_keys=True))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
