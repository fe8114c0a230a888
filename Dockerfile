# syntax=docker/dockerfile:1
# One image of rlora-service per accelerator, from the same code (deploy/README.md):
#
#   docker build -t rlora-service:cpu .                          # torch's CPU build (GBs smaller)
#   docker build --build-arg VARIANT=cuda -t rlora-service:cuda .  # torch's CUDA build: GPU engines, workers
#
# The entry point is the `rlora` command; the default command serves the API tier. Compose
# (deploy/compose.yaml) and Kubernetes (deploy/k8s/) run the other roles with other arguments.

ARG PYTHON_VERSION=3.11
# cpu or cuda: which torch the image has; all else is the same.
ARG VARIANT=cpu
# The torch the project pins (Makefile, `make install`); tests/test_deploy.py keeps them equal.
ARG TORCH_VERSION=2.13.0

# --- the project as a wheel: no compiler or sources in the images that run ---------------------
FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rlora rlora
COPY service service
COPY worker worker
COPY migrations migrations
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- what both images share: a Python and an unprivileged user ---------------------------------
FROM python:${PYTHON_VERSION}-slim AS base
# A fixed uid, so that a volume's owner is the same in every container that mounts it.
RUN groupadd --system --gid 10001 rlora \
 && useradd --system --uid 10001 --gid rlora --home-dir /var/lib/rlora --create-home rlora
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RLORA_HOME=/var/lib/rlora \
    RLORA_LOG_FORMAT=json

# --- torch for each accelerator ----------------------------------------------------------------
FROM base AS torch-cpu
ARG TORCH_VERSION
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu

FROM base AS torch-cuda
ARG TORCH_VERSION
# PyPI's Linux build of torch is the CUDA one, its CUDA libraries as wheels: the host needs
# only the NVIDIA driver (and the container toolkit that mounts it).
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}"

# --- the service on top of either ----------------------------------------------------------------
FROM torch-${VARIANT} AS service
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER rlora
WORKDIR /var/lib/rlora
# The API (rlora serve), an engine (rlora engine) and a worker's metrics port.
EXPOSE 8000 8200 9101
ENTRYPOINT ["rlora"]
CMD ["serve", "--no-worker", "--host", "0.0.0.0", "--port", "8000"]
