"""A fake Kaggle API server on 127.0.0.1 for the real `kaggle` CLI (which reaches it as an HTTP proxy).

The CLI (kaggle 2.2.5) POSTs camelCase JSON to http://localhost/api/v1/<service>/<Method> when
KAGGLE_API_ENVIRONMENT=LOCALHOST; with HTTP_PROXY pointing here, those requests arrive at this server.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class FakeKaggle:
    def __init__(self, error: str = ""):
        self.error = error          # what SaveKernel answers in its `error` field ("" = success)
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)) or 0)
                path = urlsplit(self.path).path
                fake.requests.append({"path": path, "json": json.loads(body or b"{}"),
                                      "authorization": self.headers.get("Authorization", "")})
                if path.endswith("KernelsApiService/SaveKernel"):  # /api/v1/kernels.KernelsApiService/SaveKernel
                    slug = fake.requests[-1]["json"].get("slug", "")
                    reply = {"ref": f"/code/{slug}", "url": f"https://www.kaggle.com/code/{slug}",
                             "versionNumber": 7, "error": fake.error}
                else:
                    reply = {}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeKaggle":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def pushes(self) -> list[dict]:
        return [r for r in self.requests if r["path"].endswith("/SaveKernel")]
