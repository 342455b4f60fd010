"""Node agent that applies MIG geometry through NVML and reports state."""
