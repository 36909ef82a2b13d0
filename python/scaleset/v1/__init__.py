"""Generated protobuf and gRPC modules (produced at install time from proto/scaleset/v1)."""
