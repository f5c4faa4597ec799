#!/usr/bin/env bash
# An environment for the LatentMAS reference code (benchmarks/reference_latentmas.py, P6 in docs/benchmarks.md).
# The reference was written against transformers 4.x (it indexes DynamicCache as a tuple, which 5.x removed), so
# it gets its own venv: transformers 4.57 and its hub client installed here, torch and everything else taken from
# the project's venv (a .pth file puts that venv's site-packages after this one's, so the 4.x packages win).
#   usage: bash scripts/reference-env.sh [PROJECT_VENV=.venv] [REFERENCE_VENV=.venv-reference]
set -euo pipefail
base=${1:-.venv}
ref=${2:-.venv-reference}
test -x "$base/bin/python" || { echo "no project venv at $base: run 'make setup' first" >&2; exit 1; }
base_site=$("$base/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
python3 -m venv "$ref"
ref_site=$("$ref/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$base_site" > "$ref_site/project-venv.pth"
"$ref/bin/pip" install -q 'transformers==4.57.1'
"$ref/bin/python" -c 'import torch, transformers; print(f"reference env: torch {torch.__version__}, transformers {transformers.__version__}")'
