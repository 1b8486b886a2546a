"""Hugging Face Spaces on your own hardware: the appliance package."""

__version__ = "0.1.0"
