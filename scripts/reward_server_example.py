#!/usr/bin/env python3
"""An example reward server for `models.reward.kind: http` (docs/rewards.md), standard library only.

The run's workers POST batches of rows to it as {"rows": [row, ...]}; each row has `prompt`,
`messages`, `response`, `answer` (or null) and `extra` (the prompt row's other columns). It
answers {"scores": [...]}, one per row in order, here an object per row:

    {"score": correct + length_penalty, "correct": 1 or 0, "length_penalty": <= 0}

`correct` is 1 when the response's last number equals the answer's last number; the penalty
takes 0.001 per character of response beyond `extra.max_chars` (default 200). The components
appear in the run's metrics.jsonl as attribute/correct and attribute/length_penalty.

    python3 scripts/reward_server_example.py --port 8000
    # run file: models: {reward: {kind: http, url: "http://127.0.0.1:8000/score"}}

--port 0 picks a free port. The server prints one line, `listening on http://HOST:PORT/`, once
it accepts connections. --log FILE appends every row it receives to FILE as JSON lines, to see
what the run sends.
"""
import argparse
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text):
    """The last number in `text` (thousands separators dropped), or None."""
    found = NUMBER.findall((text or "").replace(",", ""))
    return float(found[-1]) if found else None


def score(row):
    """One row's answer: the reward and its named components."""
    got, want = last_number(row["response"]), last_number(row.get("answer"))
    correct = 1.0 if got is not None and got == want else 0.0
    max_chars = row.get("extra", {}).get("max_chars", 200)
    length_penalty = -0.001 * max(0, len(row["response"]) - max_chars)
    return {"score": correct + length_penalty, "correct": correct, "length_penalty": length_penalty}


class Handler(BaseHTTPRequestHandler):
    # Keep-alive: the workers reuse one connection per request thread.
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY: the headers and the body go out in two writes, and without it the body
    # waits for the client's delayed ACK of the headers, about 40 ms per request.
    disable_nagle_algorithm = True
    log_file = None
    log_lock = threading.Lock()

    def do_POST(self):
        try:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            rows = json.loads(body)["rows"]
            scores = [score(r) for r in rows]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            # A 4xx is not retried: the run stops with this message.
            return self.answer(400, {"error": f"bad request: {e!r}"})
        if self.log_file:
            with self.log_lock, open(self.log_file, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        self.answer(200, {"scores": scores})

    def answer(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        pass  # one line per request would flood the terminal at 512 rows a step


def arguments():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--log", help="append every received row to this JSONL file")
    return p


def serve(handler, args):
    handler.log_file = args.log
    server = ThreadingHTTPServer((args.host, args.port), handler)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    serve(Handler, arguments().parse_args())
