"""mig-guard domain core: pure MIG model (profiles, catalog, config, placement, planning)."""
