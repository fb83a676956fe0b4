"""The wire schema of the deployment (``fedsec.proto``) and the helpers that frame it.

This is the only place in :mod:`fl_core` that imports grpc or protobuf. The generated modules
(``fedsec_pb2*.py``) are checked in; regenerate them from the repository root with::

    .venv/bin/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. \
        --grpc_python_out=. fl_core/wire/fedsec.proto
"""
