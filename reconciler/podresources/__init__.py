"""Generated gRPC stubs for the kubelet PodResources API v1 (see api.proto)."""
