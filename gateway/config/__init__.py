"""Configuration: the model (``model``, frozen msgspec Structs and the embedded ``default.yaml``),
loading (``load``: YAML, ``${VAR}``, path-aware type errors), whole-config checks (``check``) and the
seed documents' alternative spellings (``compat``)."""
