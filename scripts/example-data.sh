#!/usr/bin/env bash
# Writes the prompts of the second example run (configs/example-command.yaml) into DIR (default
# runs/demo-assets) as a Parquet file, the way Hugging Face datasets ship them:
#   prompts.parquet  the embedded demo's sums "a+b=" (a, b in 0..4) in the columns `prompt`,
#                    `answer` (the sum, as text) and `level` (1 for sums below 5, else 2), an
#                    extra column that reaches the reward script as `extra.level`
# Needs pyarrow: the Python in $PYTHON (default python3), e.g. the venv that
# `scripts/setup-torch.sh --test-deps` fills from scripts/requirements-test.txt.
set -euo pipefail
dir=${1:-runs/demo-assets}
mkdir -p "$dir"
"${PYTHON:-python3}" - "$dir/prompts.parquet" <<'PY'
import sys

try:
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:
    sys.exit("scripts/example-data.sh needs pyarrow: run `scripts/setup-torch.sh --test-deps` "
             "and eval its output, or set PYTHON to an interpreter that has it")

rows = [
    {"prompt": f"{a}+{b}=", "answer": str(a + b), "level": 1 if a + b < 5 else 2}
    for a in range(5)
    for b in range(5)
]
pq.write_table(pa.Table.from_pylist(rows), sys.argv[1])
PY
