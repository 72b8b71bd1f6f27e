#!/bin/sh
# Runs once, on the first start of an empty data volume (the postgres image's initdb hook):
# MLflow's tracking store uses POSTGRES_DB (mlflow); its auth app and Prefect get their own.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE DATABASE mlflow_auth;
CREATE DATABASE prefect;
SQL
