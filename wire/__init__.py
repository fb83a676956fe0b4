"""The wire schema of the deployment (``fedsec.proto``) and the helpers that frame it.

The deployment's edge: protobuf messages are built and read here and turned into the domain
objects of :mod:`secagg` and :mod:`fl_core` (:mod:`wire.convert`), which never import it. The
generated modules (``fedsec_pb2*.py``) are checked in; regenerate them from the repository root
with::

    .venv/bin/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. \
        --grpc_python_out=. wire/fedsec.proto
"""
