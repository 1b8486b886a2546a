"""Hugging Face compatible Spaces API (what huggingface_hub.HfApi calls) over the services."""

from __future__ import annotations

from flask import Flask, jsonify

from .errors import ApplianceError


def hf_error(exc: ApplianceError):
    """Errors in the shape huggingface_hub reads: {"error": message}."""
    text = exc.message + (f" ({exc.hint})" if exc.hint else "")
    return jsonify({"error": text}), exc.status


def register(app: Flask) -> None:
    pass
