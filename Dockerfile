# modelgate image: the proxy, the replica runtime and the bundled examples.
#   docker build -t modelgate . && docker run -p 8080:8080 -v modelgate-data:/srv/modelgate/data modelgate
# The first start writes the admin's API key to /srv/modelgate/data/admin-api-key (read it with
# `docker exec`), or set MODELGATE_ADMIN_API_KEY (a key of the mgk_ form) for that first start.
# Serve TLS by mounting a certificate and key and pointing server.tls_cert / tls_key at them.
# Debian 12's python3 is CPython 3.11, the interpreter replica-runtime links against.

FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3-dev openssl && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ENV PYO3_PYTHON=python3
# PGO=1 (the default) builds modelgate and replica-runtime with profile-guided optimisation, as
# loadtests/pgo-build.sh does: an instrumented build serves a short, checked load of the bundled
# add model on 127.0.0.1 inside this stage, over plain HTTP and over TLS (a throwaway
# certificate made with openssl), with an instrumented runtime as its replica, which also
# answers the same model over its socket alone; their profiles shape the final builds (five release builds instead of one; 20-25 %
# fewer instructions per request in the proxy over HTTP, 19 % over TLS, 8 % in the replica,
# docs/PERFORMANCE.md). It fetches rustup's llvm-tools component. PGO=0 is a plain release build.
ARG PGO=1
RUN if [ "$PGO" = 1 ]; then \
      bash loadtests/pgo-build.sh && cp target/pgo/release/modelgate target/pgo/release/replica-runtime target/release/; \
    else \
      cargo build --release -p modelgate -p replica-runtime; \
    fi

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpython3.11 python3 python3-pip \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --system --home /srv/modelgate modelgate
WORKDIR /srv/modelgate
COPY --from=build /src/target/release/modelgate /src/target/release/replica-runtime /usr/local/bin/
COPY examples ./examples
# The store, builds and dependency cache go to ./data; the Iris build pip-installs scikit-learn
# into that cache on first start and trains model.pkl in its build.sh.
RUN mkdir data && chown -R modelgate /srv/modelgate
USER modelgate
EXPOSE 8080
ENTRYPOINT ["modelgate", "serve", "--listen", "0.0.0.0:8080"]
