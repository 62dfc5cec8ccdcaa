"""Configs: the model's, the training runs', their YAML files, and the command line generated from them.

  model.py             FCMAEConfig (the one description of an FCMAE model), ClassifierConfig (finetune.py's
                       timm classifier), the ConvNeXt V2 sizes
  training_configs.py  TrainConfig, PretrainConfig (holds an FCMAEConfig), FinetuneConfig (holds a
                       ClassifierConfig); their mapping form
  command_line.py      the flags, generated from the fields (help = each field's comment, default shown)
  yaml_files.py        --config files in, config.yaml out
  augmentation.py      timm's transform strings (aa, interpolation), checked when the config is read

Precedence: dataclass defaults < `--config FILE` < command-line flags. Every field is a flag spelled with dashes
or underscores (`--mask-ratio`, `--mask_ratio`) and a YAML key spelled with underscores (`mask_ratio`); the
model's settings go in a `model:` section. An unknown key or flag fails with "did you mean". The resolved config
is written next to the run's outputs and into every checkpoint (config.yaml).

Imported on first use (PEP 562): the model (`fcmae.config.model`) loads this package without the training
configs and the command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy_exports import lazy_exports

if TYPE_CHECKING:  # what __getattr__ imports, for type checkers and readers
    from ..errors import ConfigError
    from .command_line import OneLineArgumentParser, build_parser, flag_table, parse_config
    from .model import ClassifierConfig, FCMAEConfig
    from .training_configs import LINEAR_PROBE_RECIPE, FinetuneConfig, PretrainConfig, TrainConfig, from_dict
    from .yaml_files import load_yaml, save_yaml

# name -> the module that defines it
_ATTRIBUTES = {
    "ConfigError": "..errors", "FCMAEConfig": ".model", "ClassifierConfig": ".model",
    "TrainConfig": ".training_configs", "PretrainConfig": ".training_configs", "FinetuneConfig": ".training_configs",
    "from_dict": ".training_configs", "LINEAR_PROBE_RECIPE": ".training_configs",
    "parse_config": ".command_line", "OneLineArgumentParser": ".command_line", "build_parser": ".command_line",
    "flag_table": ".command_line", "load_yaml": ".yaml_files", "save_yaml": ".yaml_files",
}
__all__ = list(_ATTRIBUTES)

__getattr__, __dir__ = lazy_exports(__name__, _ATTRIBUTES)
