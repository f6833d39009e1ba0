"""The KServe v2 / Open Inference Protocol HTTP/REST endpoint, beside gRPC on the same models."""
