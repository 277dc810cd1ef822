"""Reads a directory of TensorBoard event files with tbparse (which parses each file with
TensorBoard's own EventAccumulator), for the tests of rlhf-coord's event writer
(crates/rlhf-coord/tests/launch.rs and resume.rs, through tests/common/mod.rs).

Usage: read_tensorboard.py DIR. Prints one JSON object:
  {"scalars": [[file_name, tag, step, value], ...], "text": [[file_name, tag, step, text], ...]}
with every scalar and text point of every event file in DIR, in file-name order.
"""
import json
import sys

from tbparse import SummaryReader


def main():
    reader = SummaryReader(sys.argv[1], extra_columns={"file_name"})
    out = {}
    for kind, frame in (("scalars", reader.scalars), ("text", reader.text)):
        rows = []
        for r in frame.itertuples(index=False):
            value = float(r.value) if kind == "scalars" else str(r.value)
            rows.append([r.file_name, r.tag, int(r.step), value])
        rows.sort(key=lambda row: (row[0], row[1], row[2]))
        out[kind] = rows
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
