"""scripts/reward_server_example.py with faults, for crates/rlhf-worker/tests/http_reward.rs.

Scores rows as the example does, unless --fault says otherwise:
  none         the example's answers (after --delay seconds)
  slow         every request waits --delay seconds before answering
  slow-first   the first request waits --delay seconds, the others answer at once
  500-first    the first request is answered 500, the others as the example does
  500          every request is answered 500 with the body `reward backend exploded`
  malformed    every request is answered 200 with a body that is not JSON
  short        every answer has one score fewer than its request has rows
GET /stats answers {"requests": N, "max_in_flight": M, "batch_sizes": [...]}: what was POSTed.
"""
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "../../../scripts"))
import reward_server_example as example  # noqa: E402

lock = threading.Lock()
stats = {"requests": 0, "max_in_flight": 0, "batch_sizes": []}
in_flight = 0


class Faulty(example.Handler):
    def do_GET(self):
        with lock:
            self.answer(200, stats)

    def do_POST(self):
        global in_flight
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        rows = json.loads(body)["rows"]
        with lock:
            n = stats["requests"]
            stats["requests"] += 1
            stats["batch_sizes"].append(len(rows))
            in_flight += 1
            stats["max_in_flight"] = max(stats["max_in_flight"], in_flight)
        try:
            self.respond(n, rows)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the worker gave up waiting (slow faults)
        finally:
            with lock:
                in_flight -= 1

    def respond(self, n, rows):
        fault = args.fault
        if fault in ("none", "slow") or (fault == "slow-first" and n == 0):
            time.sleep(args.delay)
        if fault == "500" or (fault == "500-first" and n == 0):
            return self.raw(500, b"reward backend exploded")
        if fault == "malformed":
            return self.raw(200, b'{"scores": [1, 2')
        scores = [example.score(r) for r in rows]
        if fault == "short":
            scores.pop()
        self.answer(200, {"scores": scores})

    def raw(self, status, data):
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


if __name__ == "__main__":
    p = example.arguments()
    p.add_argument(
        "--fault",
        default="none",
        choices=["none", "slow", "slow-first", "500-first", "500", "malformed", "short"],
    )
    p.add_argument("--delay", type=float, default=0.0, help="seconds (none, slow, slow-first)")
    args = p.parse_args()
    example.serve(Faulty, args)
