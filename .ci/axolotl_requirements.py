"""Print the unconditional requirements (Requires-Dist without an ``extra ==`` marker) of a downloaded wheel.

Axolotl 0.21.0 declares Python >= 3.12 and pins versions the main venv cannot share, so `make axolotl-venv`
installs its requirement list into a separate Python 3.11 venv first and the wheel itself with --no-deps
--ignore-requires-python (see RESOURCES.md). Usage: python .ci/axolotl_requirements.py DIR_WITH_WHEEL
"""

import sys
import zipfile
from pathlib import Path

wheels = sorted(Path(sys.argv[1]).glob("axolotl-*.whl"))
if len(wheels) != 1:
    raise SystemExit(f"expected one axolotl wheel in {sys.argv[1]}, found {[w.name for w in wheels]}")
with zipfile.ZipFile(wheels[0]) as wheel:
    metadata = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    for line in wheel.read(metadata).decode("utf-8").splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            print(line.split(":", 1)[1].strip())
