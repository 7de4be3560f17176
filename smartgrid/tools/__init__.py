"""Command-line tools for operators (``python -m smartgrid.tools.<name>``)."""
