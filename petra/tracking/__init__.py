"""Tracking: the MLflow store and its runs, the durable recorder and journal, reading searches
back (fronts, comparisons), the front pages and plots, the UI and the progress line."""
