"""The flow's name for deployments registered before the Prefect adapter was a package.

A deployment stores its entrypoint in Prefect's database; those made by earlier lmflow
versions name `lmflow.compile.lmflow_flow`. New ones name `lmflow.prefect.flow.lmflow_flow`.
"""

from .prefect.flow import lmflow_flow

__all__ = ["lmflow_flow"]
