"""A model at rest: what a saved model is, where it comes from, and the one way to load it.

Every stage that reads or writes a model sits above this wing: training saves checkpoints and
logs models through it, prediction, evaluation, serving and the mapping workers load through
`artifacts.load`. Nothing here runs code a model file names, and nothing here imports a
command: the CNTK reader and the 2018 models' settings are constants, not a command's YAML.

- `reference`: references (run id, `runs:/`, `models:/name@alias`, `.pt`, `.onnx`, CNTK
  `.model`) resolved, fetched and loaded into a `LoadedModel`
- `files`, `flavour`: the safetensors + JSON format and its MLflow flavour
- `checkpoint`: training checkpoints written atomically, read without unpickling
- `bounds`, `mlmodel_guard`: stored metadata and MLmodel files checked before anything is built
- `onnx_file`, `cntk_proto`, `cntk_graph`, `tutorial_model`: ONNX files and the 2018 CNTK models
"""

from landcover.artifacts.reference import LoadedModel, ModelReferenceError, load

__all__ = ["LoadedModel", "ModelReferenceError", "load"]
