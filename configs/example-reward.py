"""The reward script of configs/example-command.yaml (`models.reward.kind: command`): standard
library only, one long-lived process per pool slot.

It reads one row per line on stdin, a JSON object with `prompt`, `messages`, `response`,
`answer` and `extra` (the prompt row's other columns; here `level`), and answers each row
with one line of JSON on stdout, in order, flushed:

    {"score": 1.1, "correct": 1, "format": 1}

`score` is the reward; `correct` (the response's last number equals `answer`) and `format` (the
response is just a number) are logged beside it as attribute/correct and attribute/format. Only
answers go to stdout: anything else (logs, debugging) goes to stderr, whose last lines the worker
quotes if this process fails. docs/rewards.md describes the protocol.
"""
import json
import re
import sys

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def score(row):
    response = row["response"].strip()
    numbers = NUMBER.findall(response)
    correct = int(bool(numbers) and row["answer"] is not None and float(numbers[-1]) == float(row["answer"]))
    well_formed = int(NUMBER.fullmatch(response) is not None)
    return {"score": correct + 0.1 * well_formed, "correct": correct, "format": well_formed}


def main():
    for line in sys.stdin:
        print(json.dumps(score(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
