"""Subcommands of `mig-guard`, one module each."""
