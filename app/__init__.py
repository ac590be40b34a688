"""The saescope feature browser: HTML pages (Jinja2 + htmx) and the REST API under /api/v1."""
