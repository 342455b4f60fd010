"""Generated gRPC stubs for the kubelet PodResources API v1 (see api.proto).

The generated modules are untyped; they are exposed here as `Any` so typed code can use them.
"""

import importlib
from typing import Any

api_pb2: Any = importlib.import_module("reconciler.podresources.api_pb2")
api_pb2_grpc: Any = importlib.import_module("reconciler.podresources.api_pb2_grpc")
