# syntax=docker/dockerfile:1
# coordinator replica image: build the wheel (compiling the Cython relay) in one stage, install it
# into a slim runtime without a compiler, run as an unprivileged user.
#   docker build -t coordinator:0.1.0 .
#   docker run --rm -p 3000:3000 -e COORDINATOR_PG_CONNECTION_URL=postgres://... coordinator:0.1.0
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The project's wheel plus every dependency's, so the runtime stage installs offline.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:${PYTHON_VERSION}-slim AS runtime
RUN groupadd --system --gid 10001 coordinator \
 && useradd --system --uid 10001 --gid coordinator --home-dir /var/lib/coordinator --create-home coordinator
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels coordinator-ha
ENV COORDINATOR_ADDRESS=*:3000 \
    COORDINATOR_DATA_DIR=/var/lib/coordinator \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/coordinator
EXPOSE 3000 2112
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/healthz', timeout=2)"]
ENTRYPOINT ["coordinator"]
CMD ["server"]
