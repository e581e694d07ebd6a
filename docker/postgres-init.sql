-- Runs once, when the PostgreSQL volume is first initialised (docker-entrypoint-initdb.d).
-- POSTGRES_DB creates the MLflow database; Prefect gets its own, owned by the same role.
CREATE DATABASE prefect;
