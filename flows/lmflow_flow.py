"""Importable Prefect entry point for deployments: `flows/lmflow_flow.py:lmflow_flow`.

The flow takes the spec's path (and optional params), so one deployment per
spec re-imports the same top-level flow by name.
"""

from lmflow.prefect.flow import lmflow_flow

__all__ = ["lmflow_flow"]
