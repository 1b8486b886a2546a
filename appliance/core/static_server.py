"""Serve a static Space's files read-only; executes nothing from the repository."""

import argparse
import http.server
import os
import posixpath
import urllib.parse


class StaticHandler(http.server.SimpleHTTPRequestHandler):
    """Files under the root only: no directory listings, no symlinks leading out, no CGI."""

    root = "."
    index = "index.html"

    def translate_path(self, path: str) -> str:
        """Map a URL path to a file under the root, or "" when it must not be served."""
        path = urllib.parse.unquote(urllib.parse.urlsplit(path).path)
        path = posixpath.normpath(path).lstrip("/")
        if path in ("", "."):
            path = self.index
        full = os.path.realpath(os.path.join(self.root, path))
        if not full.startswith(self.root + os.sep):
            return ""
        if os.path.isdir(full):
            inner = os.path.join(full, "index.html")
            return inner if os.path.isfile(inner) else ""
        return full

    def send_head(self):
        if not self.translate_path(self.path):
            self.send_error(404, "Not found")
            return None
        return super().send_head()

    def list_directory(self, path):
        self.send_error(404, "Not found")
        return None

    def end_headers(self) -> None:
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--index", default="index.html")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args()
    StaticHandler.root = os.path.realpath(args.root)
    StaticHandler.index = args.index
    server = http.server.ThreadingHTTPServer(("0.0.0.0", args.port), StaticHandler)
    server.serve_forever()


if __name__ == "__main__":
    main()
