"""Hugging Face compatible Spaces API (what huggingface_hub.HfApi calls) over the services."""

from __future__ import annotations

from flask import Flask


def register(app: Flask) -> None:
    pass
