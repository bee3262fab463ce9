#!/usr/bin/env bash
# Entry command: hold the job's resources for its drawn duration, leave the knobs in $OUT_DIR.
set -euo pipefail
python job.py
