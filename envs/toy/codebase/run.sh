#!/usr/bin/env bash
# Entry command: fit the line, leave model.json in $OUT_DIR.
set -euo pipefail
python main.py
