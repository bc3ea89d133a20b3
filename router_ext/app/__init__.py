"""The router process and its operator surfaces: server wiring, admin API and CLI, telemetry,
logs and the `router-ext` command. May import every product layer; never the harness at
import time (`router-ext sim` / `demo` load it when run)."""
