"""The Prefect adapter: the only package that imports Prefect (tests/test_layout.py keeps it so).

`flow`: the one flow every run is, and the executor that makes units task runs;
`server`: which Prefect API a run talks to, and the lmflow-managed server;
`history`: runs read back from Prefect (`lmflow runs`); `deploy`: deployments; `serving`:
`lmflow serve` and `lmflow worker` (Prefect's runner and process worker, their report of each
run, their stop); `limits`: a concurrency limit per model server shared by runs.
Importing this package imports nothing of Prefect; its modules do.
"""
