-- First start of the compose Postgres: pgvector for the records' embeddings (the platform's migrations need it)
-- and a second database for the MLflow server's backend store.
CREATE EXTENSION IF NOT EXISTS vector;
CREATE DATABASE mlflow;
