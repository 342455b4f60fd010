"""Validating and mutating admission webhook for nvidia.com/mig.config."""
