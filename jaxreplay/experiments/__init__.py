"""Experiments: sweep definitions and expansion, the runner, reports and the quickstart."""
