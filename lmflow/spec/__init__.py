"""Reading specs: YAML with positions, the JSON Schema, validation, templates."""

from .model import ModelConfig, Policy, ServerConfig, Spec, StepSpec
from .schema import spec_schema
from .validate import load_spec, validate_files

__all__ = [
    "ModelConfig", "Policy", "ServerConfig", "Spec", "StepSpec",
    "load_spec", "spec_schema", "validate_files",
]
