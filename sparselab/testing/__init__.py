"""Helpers for sparselab's own tests (a real JupyterLab driven by headless Chromium)."""
