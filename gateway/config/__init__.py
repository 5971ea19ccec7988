"""Configuration: the model (``model``: frozen msgspec Structs), reading it (``parse``: the embedded
``default.yaml`` or a file → ``Config`` or ``ConfigError``), its generic half (``load``: YAML, ``${VAR}``,
path-aware type errors), whole-config checks (``check``) and the seed documents' alternative
spellings (``compat``). Import the reading functions from here; the Structs from ``model``."""

from gateway.config.check import config_warnings, cross_check, dialect
from gateway.config.parse import DEFAULT_CONFIG_TEXT, ConfigError, load_config, parse_config

__all__ = ["DEFAULT_CONFIG_TEXT", "ConfigError", "config_warnings", "cross_check", "dialect", "load_config",
           "parse_config"]
