"""The mig-guard command line: wires the core, webhook, reconciler and certs together."""
