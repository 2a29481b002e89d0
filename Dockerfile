# authz: the ext_authz + ext_proc service. Build: docker build -t authz .  (step by step: docs/deploy/docker.md)
# Run:   docker run -p 9191:9191 -p 127.0.0.1:9192:9192 -v $PWD/examples:/etc/authz \
#          -v $PWD/certs:/etc/authz-tls -e AUTHZ_TLS_CERT=/etc/authz-tls/tls.crt \
#          -e AUTHZ_TLS_KEY=/etc/authz-tls/tls.key -e AUTHZ_TLS_CLIENT_CA=/etc/authz-tls/ca.crt authz
# gRPC listens on 0.0.0.0 in the container, so it needs mTLS (the AUTHZ_TLS_* files, re-read
# when they change) or, on a network only the gateway can reach, AUTHZ_INSECURE_PLAINTEXT=1
# (logged as a warning); with neither it refuses to start. The admin port has no credential:
# publish it to the host's loopback at most, never beyond the cluster network.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY authz ./authz
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 authz \
 && install -d -o 10001 /var/lib/authz /var/lib/authz/authz-state
USER 10001
# State lives under /var/lib/authz/authz-state: the embedded sqlite ledger
# (ledger.db, the default ledger.url sqlite:///authz-state/ledger.db) and, with Redis, the
# breaker's usage journal. Mount a volume there (-v authz-state:/var/lib/authz/authz-state)
# or budgets start full again with every new container. One container per volume.
WORKDIR /var/lib/authz
# glibc malloc, not pymalloc, so memory goes back after a burst of callers (see
# authz/allocator.py; set it here so `authz serve` need not restart itself to get it).
ENV PYTHONMALLOC=malloc
EXPOSE 9191 9192
# gRPC (ext_authz + ext_proc + health + reflection) on 9191, admin HTTP on 9192 (explicit
# 0.0.0.0 here: out of the box, outside a container, both listen on 127.0.0.1 only).
HEALTHCHECK --interval=10s --timeout=2s \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9192/healthz', timeout=2).status != 200)"]
# SIGTERM drains (no new checks, in-flight finish, usage flushed): give it a grace period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["authz", "serve", "--grpc-address", "0.0.0.0:9191", "--http-address", "0.0.0.0:9192"]
CMD ["--config", "/etc/authz/policy.yaml"]
