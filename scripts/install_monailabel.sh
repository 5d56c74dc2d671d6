#!/usr/bin/env bash
# Install the MONAI Label server (0.8.5) into the project's virtual environment, beside its pinned stack.
#
#   bash scripts/install_monailabel.sh            # uses .venv/bin/python
#   PYTHON=/path/to/python bash scripts/install_monailabel.sh
#
# `pip install monailabel` cannot work here: it requires numpymaxflow (numpy < 2) while cuCIM needs numpy >= 2.
# So the pinned runtime dependencies are installed with the project's constraints, then monailabel and
# pydicom-seg without theirs. The last step proves the server's modules import.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"

"$python" -m pip install -q -c "$root/constraints.txt" -r "$root/scripts/monailabel_requirements.txt"
"$python" -m pip install -q --no-deps monailabel==0.8.5 pydicom-seg==0.4.1
"$python" -c "import monailabel.app, monailabel.interfaces.tasks.infer_v2; print('MONAI Label', monailabel.__version__)"
