"""Print the folder of the virtual environment scripts/env.sh uses for a requirements file:
<GLM_VENV_ROOT>/<hash of the file and those it includes>-tf<newest transformers release they allow>-py<version>.

The newest transformers release (as pip resolves the file's transformers constraints, following -r includes,
against the package index: about 2 s) is part of the name, so a new release gets a new environment the day it
appears and CI tests it. When the index does not answer, the newest finished environment made for the same files
is used (a note says so on stderr).

    python3 scripts/venv_path.py requirements-test.txt
"""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

def requirement_files(path: Path) -> list:
    """A requirements file and the files it includes (-r), in order."""
    files = [path]
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r"):
            files += requirement_files((path.parent / line[2:].strip()).resolve())
    return files


def transformers_spec(files) -> str:
    """The transformers constraints of requirements files, joined: '>=4.57,<6,<4.58'."""
    specs = []
    for path in files:
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if re.match(r"transformers\s*[<>=!~]", line):
                specs.append(re.sub(r"^transformers\s*", "", line).replace(" ", ""))
    return ",".join(specs)


def newest_transformers(files):
    """The version pip would install for the files' transformers constraints, or None if the index did not answer."""
    try:
        report = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
                                 "-q", "--report", "-", f"transformers{transformers_spec(files)}"],
                                capture_output=True, text=True, timeout=60)
        if report.returncode == 0:
            return json.loads(report.stdout)["install"][0]["metadata"]["version"]
        why = (report.stderr.strip().splitlines() or ["no message"])[-1]
    except (subprocess.TimeoutExpired, ValueError, LookupError) as error:
        why = f"{type(error).__name__}: {error}"
    print(f"note: pip could not ask the package index for the newest transformers ({why[:200]})", file=sys.stderr)
    return None


def venv_path(requirements: Path, root: Path) -> Path:
    files = requirement_files(requirements)
    base = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
    python = "py%d%d" % sys.version_info[:2]
    version = newest_transformers(files)
    if version:
        return root / f"{base}-tf{version}-{python}"
    made = sorted((d for d in root.glob(f"{base}-tf*-{python}") if (d / ".complete").is_file()),
                  key=lambda d: d.stat().st_mtime, reverse=True)
    chosen = made[0] if made else root / f"{base}-tf-unknown-{python}"
    print(f"note: using {chosen}", file=sys.stderr)
    return chosen


if __name__ == "__main__":
    root = Path(os.environ.get("GLM_VENV_ROOT") or Path.home() / ".cache" / "glm-hf-venvs")
    print(venv_path(Path(sys.argv[1]).resolve(), root))
