"""The Spaces' proxy: /s/<owner>--<name>/... forwarded to the Space's port, streams and all."""

from __future__ import annotations

from flask import Flask


def register(app: Flask) -> None:
    pass
