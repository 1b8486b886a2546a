"""The portal: Flask app, pages, JSON and HF-compatible APIs, the proxy, templates, static."""
