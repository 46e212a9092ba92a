"""Run trainctl commands on a real small (or read-only) filesystem, inside a private mount namespace.

    unshare --mount [--user --map-root-user] python tests/smallfs.py SCENARIO.json

The scenario names a mount point, the size of the tmpfs mounted there, and steps:
``{"fill": BYTES_LEFT}`` fills the filesystem until that many bytes are free, ``{"readonly": true}``
remounts it read-only, ``{"trainctl": [ARGS...]}`` runs the CLI. What the test needs to see is printed
as JSON - each command's exit code and output, the files left under the mount point with their sizes,
and the contents of every summary.json - because the mount vanishes with the namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def main() -> None:
    scenario = json.loads(Path(sys.argv[1]).read_text())
    mount = Path(scenario["mount"])
    mount.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={scenario['size']}", "tmpfs", str(mount)], check=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    results = []
    for step in scenario["steps"]:
        if "fill" in step:
            (mount / "filler").unlink(missing_ok=True)
            free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
            with open(mount / "filler", "wb") as handle:
                handle.write(b"\0" * max(0, free - step["fill"]))
        elif step.get("readonly"):
            subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        else:
            out = subprocess.run([sys.executable, "-m", "trainctl", *step["trainctl"]], cwd=scenario["cwd"],
                                 capture_output=True, text=True, env=env, timeout=300)
            results.append({"args": step["trainctl"], "code": out.returncode, "stdout": out.stdout,
                            "stderr": out.stderr})
    files = {str(p.relative_to(mount)): p.stat().st_size for p in mount.rglob("*") if p.is_file() and p.name != "filler"}
    summaries = {str(p.parent.relative_to(mount)): json.loads(p.read_text()) for p in mount.rglob("summary.json")}
    print(json.dumps({"results": results, "files": files, "summaries": summaries}))


if __name__ == "__main__":
    main()
