"""A minimal webhook receiver: prints (or appends to a file) each JSON notification it gets.

The compose stack routes Alertmanager here so a first run shows alerts arriving
without any outside service; tests/deploy uses it as the end of the
Prometheus -> Alertmanager -> webhook path. Standard library only, so it runs in
a plain ``python:3.11-slim`` container. Not a production receiver: no
authentication, no signature check (see streams.alerts.verify for the worker's
own signed webhooks).

    python webhook_receiver.py --host 0.0.0.0 --port 8080 [--out notifications.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--out", help="append one JSON line per notification here (default: stdout)")
    args = parser.parse_args(argv)
    lock = threading.Lock()  # requests are handled on threads; lines must not interleave

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                doc = json.loads(body)
            except ValueError:
                self.send_response(400)
                self.end_headers()
                return
            line = json.dumps({"path": self.path, "body": doc}, sort_keys=True) + "\n"
            with lock:
                if args.out:
                    with open(args.out, "a", encoding="utf-8") as f:
                        f.write(line)
                else:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *a: object) -> None:  # one line per notification is enough
            pass

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"webhook receiver on http://{args.host}:{server.server_port}/", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
