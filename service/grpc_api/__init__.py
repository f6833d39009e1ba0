"""The gRPC front: protocol messages in, core calls, protocol messages out."""
