"""Generated gRPC/protobuf stubs of the pdserve.v1 API (see protos/generate.py).

Installed as `pdserve.v1` (setup.py maps this directory there), which is the
import path protoc writes into the generated modules.
"""
