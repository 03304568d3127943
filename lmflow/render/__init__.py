"""Text for humans, one module per thing shown; the commands and the adapter fetch, these render.

`report`: a run in the terminal (progress, the table, errors, the plan); `history`: the run's
summary for Prefect's UI, and `lmflow runs` / `runs show`; `probe`: a context probe (`lmflow
probe`, the probe_context step's artifact); `server`: `lmflow server` and the line `lmflow run`
prints when it starts one; `charts`: line charts as SVG. A kind's own report stays with the kind
(the loop's: lmflow.steps.loop.report).

Nothing here imports Prefect or lmflow.prefect: the data comes in as arguments.
"""
