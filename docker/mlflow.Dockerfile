# syntax=docker/dockerfile:1.7
# MLflow tracking server for a team: PostgreSQL backend store, S3-compatible artifact store.
#   docker build -f docker/mlflow.Dockerfile -t peftflow-mlflow:3.17.2 .   (context: the repository root)
# Same mlflow pin as the training image, so client and server agree on the REST API and schema;
# Flask-WTF is what the basic-auth app (`--app-name basic-auth`) needs.
FROM python:3.11.7-slim-bookworm

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1

WORKDIR /opt/mlflow
COPY requirements.lock requirements-services.lock ./
RUN pip install --no-cache-dir -c requirements.lock -c requirements-services.lock \
        mlflow==3.17.2 psycopg2-binary==2.9.13 boto3==1.43.117 Flask-WTF==1.3.0 \
 && useradd --create-home --uid 1001 --shell /usr/sbin/nologin mlflow

USER 1001
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
CMD ["--host", "0.0.0.0", "--port", "5000"]
