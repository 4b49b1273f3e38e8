# The MLflow tracking server and model registry: the official image plus the Postgres driver for its backend store.
# Build:  docker build -f deploy/docker/mlflow.Dockerfile -t fibreflow/mlflow deploy/docker
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.10
EXPOSE 5000
