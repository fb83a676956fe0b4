"""The wire schema of the deployment (``fedsec.proto``) and the helpers that frame it.

The deployment's edge: protobuf messages are built and read here and turned into the domain
objects of :mod:`secagg` and :mod:`fl_core` (:mod:`wire.convert`), which never import it. The
generated modules (``fedsec_pb2*.py``) are checked in; regenerate them from the repository root
with grpcio-tools 1.81.1, the ``test`` extra's pin (its protoc emits protobuf gencode 6.33.5,
which protobuf 6.33.5+ and 7.x both accept: flwr 1.42 needs protobuf<7)::

    .venv/bin/python -m pip install 'grpcio-tools==1.81.1'
    .venv/bin/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. \
        --grpc_python_out=. wire/fedsec.proto

The stubs refuse older runtimes than they were generated for (grpcio 1.81.1, protobuf 6.33.5):
the floors in ``pyproject.toml``, which ``tests/wire/test_framing.py`` checks.
"""
