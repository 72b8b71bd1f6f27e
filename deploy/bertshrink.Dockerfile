# The bertshrink image: this checkout at /opt/bertshrink with its locked dependencies. The compose
# worker (deploy/compose) and the Kubernetes GPU pool (deploy/k8s, job variable `image`) run it.
#   docker build -f deploy/bertshrink.Dockerfile -t <registry>/bertshrink:0.1.0 .
# torch==2.13.0 from PyPI is the CUDA build on linux/x86_64, so one image serves CPU and GPU nodes.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 BERTSHRINK_HOME=/opt/bertshrink
# DVC keeps its state in a git repository.
RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/bertshrink
COPY pyproject.toml requirements.lock README.md ./
COPY bertshrink bertshrink
COPY tasks tasks
COPY flows flows
COPY tracking tracking
RUN pip install -c requirements.lock .
COPY params.yaml dvc.yaml prefect.yaml ./
COPY configs configs
COPY deploy/prefect deploy/prefect
