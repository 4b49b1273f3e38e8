# The router (`fibreflow serve`) and its keys: the `serve` extra only, no torch, no ragas, no bitsandbytes. Its
# embeddings come from an embeddings upstream (router.embeddings.upstream), its registry from an MLflow server.
# Build from the repository root:  docker build -f deploy/docker/router.Dockerfile -t fibreflow/router .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FIBREFLOW_HOME=/srv/fibreflow MLFLOW_DISABLE_TELEMETRY=true
WORKDIR /srv/fibreflow

COPY pyproject.toml README.md constraints.txt ./
COPY core core
COPY datasets datasets
COPY training training
COPY eval eval
COPY registry registry
COPY serving serving
COPY monitor monitor
COPY cli cli
RUN pip install -c constraints.txt ".[serve]"
COPY configs configs

RUN useradd --uid 10001 --home-dir /srv/fibreflow fibreflow && mkdir -p var && chown fibreflow var
USER 10001
EXPOSE 8000 9464
HEALTHCHECK --interval=15s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"
ENTRYPOINT ["fibreflow"]
CMD ["serve", "--backend", "none", "--set", "router.host=0.0.0.0"]
