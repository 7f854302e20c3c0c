"""Generated protobuf and gRPC stubs of the qlm.v1 API (see protos/qlm/v1/)."""
