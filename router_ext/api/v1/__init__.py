"""router_ext.v1 admin API, generated from proto/router_ext/v1/admin.proto: do not edit."""
