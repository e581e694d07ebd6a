"""Helpers and fixtures shared by the tests, one module per job (import them normally, e.g.
`from support.projects import make_project`; pytest puts tests/ on sys.path with tests/conftest.py):

- `projects`: real projects (`make_project`, `small_project`, `prepared_project`), DVC status and
  registered-version probes;
- `training`: tiny processed data for the train stage, the train stage as a process to kill;
- `adapters`: real adapters and trained-project fixtures for evaluate, merge, MLflow and serving;
- `services`: real team services on loopback (PostgreSQL, S3, MLflow, Prefect) and their fixtures;
- `servers`: a restartable MLflow server and a lossy HTTP proxy for the chaos tests;
- `invariants`: the one invariant checker every chaos test ends with.
- `deploying`, `deploy_stack`: evaluated versions, a Prefect server, a vLLM API recorder; the whole
  alias-move-to-serving stack on loopback (the deploy tests and bench/deploy_switch.py).

Test modules never import one another: what two of them share lives here.
"""
