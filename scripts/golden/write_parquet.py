"""Writes Parquet files with pyarrow, as Hugging Face `datasets` and users' own scripts do, for
the Parquet readers' tests (crates/rlhf-train/tests/parquet.rs, crates/rlhf-coord/tests/launch.rs).

Usage: write_parquet.py SPEC.json. SPEC is a list of files:
  {"path": ".../data/train-00000-of-00002.parquet", "rows": [{...}, ...],
   "compression": "snappy" | "zstd" | "none" (default snappy, pyarrow's default),
   "row_group_size": N (optional), "binary_columns": ["image", ...] (strings stored as bytes)}
Column types are pyarrow's inference from the rows: strings, numbers, nulls, and a list of
{role, content} objects becomes list<struct<role: string, content: string>>.
"""
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    for item in spec:
        rows = item["rows"]
        for col in item.get("binary_columns", []):
            for r in rows:
                if r.get(col) is not None:
                    r[col] = r[col].encode()
        table = pa.Table.from_pylist(rows)
        os.makedirs(os.path.dirname(item["path"]), exist_ok=True)
        pq.write_table(
            table,
            item["path"],
            compression=item.get("compression", "snappy"),
            row_group_size=item.get("row_group_size"),
        )


if __name__ == "__main__":
    main()
