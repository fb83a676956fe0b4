"""Split learning (FL-GLM style) on the institution side: the model cut, the local loop,
the server's middle blocks it reaches (in-process or over gRPC)."""
