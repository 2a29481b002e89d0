# authz: the ext_authz + ext_proc service. Build: docker build -t authz .
# Run:   docker run -p 9191:9191 -p 9192:9192 -v $PWD/examples:/etc/authz authz
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY authz ./authz
# xds-protos overwrites opentelemetry-proto's files with older ones: put them back.
RUN pip install --no-cache-dir --prefix=/install . \
 && PYTHONPATH=$(echo /install/lib/python3*/site-packages) python -c \
    'import importlib.metadata as m; print(m.version("opentelemetry-proto"))' > /tmp/otelv \
 && pip install --no-cache-dir --prefix=/install --no-deps --force-reinstall \
    "opentelemetry-proto==$(cat /tmp/otelv)"

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 authz && install -d -o 10001 /var/lib/authz
USER 10001
# The ledger breaker's usage journal lives here (./authz-state/journal.jsonl by default):
# mount a volume on it so usage journaled during a Redis outage survives a restart.
WORKDIR /var/lib/authz
EXPOSE 9191 9192
# gRPC (ext_authz + ext_proc + health + reflection) on 9191, admin HTTP on 9192.
HEALTHCHECK --interval=10s --timeout=2s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:9192/healthz').status != 200)"
# SIGTERM drains (no new checks, in-flight finish, usage flushed): give it a grace period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["authz", "serve", "--grpc-address", "0.0.0.0:9191", "--http-address", "0.0.0.0:9192"]
CMD ["--config", "/etc/authz/policy.yaml"]
