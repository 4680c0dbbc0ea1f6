#!/usr/bin/env bash
# Run by modelgate's build after requirements.txt is installed (PYTHONPATH points at it):
# trains the model so model.pkl is part of the build artifact.
set -euo pipefail
python3 fit.py
