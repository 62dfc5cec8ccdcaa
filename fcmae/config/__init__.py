"""Training configs: dataclasses read top to bottom, YAML files, and the command line generated from them.

  training_configs.py  TrainConfig, PretrainConfig (holds one FCMAEConfig), FinetuneConfig; their mapping form
  command_line.py      the flags, generated from the fields (help = each field's comment, default shown)
  yaml_files.py        --config files in, config.yaml out
  augmentation.py      timm's transform strings (aa, interpolation), checked when the config is read

Precedence: dataclass defaults < `--config FILE` < command-line flags. Every field is a flag spelled with dashes
or underscores (`--mask-ratio`, `--mask_ratio`) and a YAML key spelled with underscores (`mask_ratio`); the
model's settings go in a `model:` section. An unknown key or flag fails with "did you mean". The resolved config
is written next to the run's outputs and into every checkpoint (config.yaml).
"""

from ..errors import ConfigError
from .command_line import OneLineArgumentParser, build_parser, flag_table, parse_config
from .training_configs import LINEAR_PROBE_RECIPE, FinetuneConfig, PretrainConfig, TrainConfig, from_dict
from .yaml_files import load_yaml, save_yaml

__all__ = [
    "ConfigError", "TrainConfig", "PretrainConfig", "FinetuneConfig", "parse_config", "from_dict", "load_yaml",
    "save_yaml", "OneLineArgumentParser", "build_parser", "flag_table", "LINEAR_PROBE_RECIPE",
]
