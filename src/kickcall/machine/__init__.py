"""A kickcall machine built from a TOML config, and its run state (running / paused)."""

from .config import ConfigError, MachineConfig, default_config, load_config, parse_config
from .machine import Machine, MachineError

__all__ = ["Machine", "MachineError", "MachineConfig", "ConfigError", "default_config", "load_config",
           "parse_config"]
