"""Sphinx configuration of the lightning-rank docs: pages in Markdown (MyST), the API from the docstrings."""

import lightning_rank

project = "lightning-rank"
release = version = lightning_rank.__version__
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "screenshots.py"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False}
napoleon_google_docstring = True
html_theme = "furo"
html_title = "lightning-rank"
copyright = "2026, the lightning-rank developers"
suppress_warnings = ["myst.xref_missing"]
