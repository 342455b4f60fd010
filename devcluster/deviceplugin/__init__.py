"""The kubelet device plugin API v1beta1: generated gRPC stubs (see api.proto) and a small plugin
server for tests on a real node (:mod:`devcluster.deviceplugin.server`).

The generated modules are untyped; they are exposed here as `Any` so typed code can use them.
"""

import importlib
from typing import Any

api_pb2: Any = importlib.import_module("devcluster.deviceplugin.api_pb2")
api_pb2_grpc: Any = importlib.import_module("devcluster.deviceplugin.api_pb2_grpc")
