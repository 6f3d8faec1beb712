"""The typer app, installed as ``trimix_probe.cli``."""
