"""The report: its model and exit code (pure data), the energy model, and the renderers
(JSON/CSV/Markdown in text.py, Rich in tables.py; Rich is imported only there)."""
