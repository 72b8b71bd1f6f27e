# MLflow's own image plus what the compose setup needs: the basic-auth app's extra (Flask-WTF)
# and the PostgreSQL driver. docker-compose.yml sets MLFLOW_VERSION (= requirements.lock).
ARG MLFLOW_VERSION=3.17.2
FROM ghcr.io/mlflow/mlflow:v${MLFLOW_VERSION}
ARG MLFLOW_VERSION
RUN pip install --no-cache-dir "mlflow[auth]==${MLFLOW_VERSION}" "psycopg2-binary==2.9.13"
EXPOSE 5000
