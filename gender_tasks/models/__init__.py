"""The models: a registry of plain data (imported at DAG parse time) and the networks it builds.

`registry` holds one entry per model; `network` builds and freezes them (imports torch); `cnn` and
`transfer` are the networks themselves.
"""

from .registry import ModelSpec, ProfilePlan, get_model_spec, model_names, register, unregister

__all__ = ["ModelSpec", "ProfilePlan", "get_model_spec", "model_names", "register", "unregister"]
