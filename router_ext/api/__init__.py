"""Generated gRPC APIs of router-ext (see proto/ and scripts/gen-proto.sh)."""
