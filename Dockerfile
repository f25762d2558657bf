# One image for all three extmind services (the command picks the service).
# By default MLX runs on the CPU (Docker on a Mac cannot reach Metal); Debian's OpenBLAS is
# installed and preloaded by the services (~30x faster than the BLAS bundled with mlx).
# CUDA variant (NVIDIA driver >= 580 on the host; docs/platform.md):
#   docker build --build-arg MLX_BACKEND=cuda13 -t extmind:cuda .
# (MLX_BACKEND=cuda12 for drivers 550-579). Run it with GPUs: docker-compose.gpu.yml.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
# The MLX build: cpu, cuda12 or cuda13 (scripts/mlx-backend.sh; the version is requirements.txt's).
ARG MLX_BACKEND=cpu

# pip settings for builds behind a proxy or a private index (all optional):
#   docker build --build-arg PIP_INDEX_URL=https://pypi.example/simple \
#                --build-arg PIP_TRUSTED_HOST=pypi.example --build-arg PIP_CERT=/app/certs/ca.pem .
# PIP_CERT names a CA bundle inside the image: put the file under certs/ in the build context.
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_TRUSTED_HOST=
ARG PIP_CERT=

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models/hf \
    EXTMIND_MODEL_CACHE=/models \
    EXTMIND_LOG_FORMAT=json \
    OMP_WAIT_POLICY=PASSIVE

RUN apt-get update \
 && apt-get install -y --no-install-recommends libopenblas0-pthread \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies first so that code changes do not rebuild this layer.
# No PyTorch: the services never import it (requirements-nodeps.txt says why it is separate).
COPY requirements.txt requirements-nodeps.txt ./
COPY scripts/mlx-backend.sh ./scripts/
COPY certs ./certs
RUN export PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_CERT \
 && for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_CERT; do [ -n "$(printenv $v)" ] || unset $v; done \
 && mlx_req="$(EXTMIND_MLX_BACKEND="$MLX_BACKEND" scripts/mlx-backend.sh)" \
 && pip install -r requirements.txt "$mlx_req" \
 && pip install --no-deps -r requirements-nodeps.txt \
 && ! pip show torch >/dev/null 2>&1

COPY pyproject.toml ./
COPY protos ./protos
COPY extmind ./extmind
COPY services ./services
# The offline default generator model (models/extmind-facts-6m, 11.5 MB; see its README.md).
COPY models ./models
RUN pip install --no-deps . \
 && useradd --system --uid 10001 --home-dir /app extmind \
 && mkdir -p /models /data && chown extmind /models /data

USER extmind
VOLUME ["/models"]
EXPOSE 50051 50052 50053 8000 8001 8002

# Every service listens on all interfaces inside its container.
ENV EMBEDDER_HOST=0.0.0.0 MEMORY_HOST=0.0.0.0 GENERATOR_HOST=0.0.0.0 \
    EXTMIND_HEALTH_FILE=/tmp/extmind-serving

# `python -m extmind.cluster exec NAME` builds the same command line as the local launcher
# (and the default random-weight generator model when GENERATOR_MODEL is unset), then execs it.
ENTRYPOINT ["python", "-m", "extmind.cluster", "exec"]
CMD ["embedder"]
