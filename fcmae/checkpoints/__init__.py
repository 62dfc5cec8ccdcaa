"""Every file this project reads or writes.

    names        the name of each artifact a run writes (docs/pretraining.md, "Files a run writes")
    formats      `load(path)`: the one reader; recognizes each kind of input and its key layout
    layouts      key layouts (fcmae, timm, official-me, official-dense) from key names
    model_file   our model files: `save_model`, atomic `write_safetensors`, strict state-dict loading
    loading      `load_model`: an FCMAE model from any input that records its config
    torch_file   torch.save files, read with weights_only=True
    store        training-state folders: save, prune, find, resume, compatibility
    output       output files and folders: their checks, atomic writes, and failed writes explained in one line
"""

from .formats import KINDS, Loaded, load
from .layouts import LAYOUTS, detect_layout
from .loading import load_model
from .model_file import format_keys, load_state_dict_strict, read_model_file, save_model, write_safetensors
from .output import OutputError, check_output_folder

__all__ = [
    "load", "Loaded", "KINDS", "LAYOUTS", "detect_layout", "load_model", "save_model", "write_safetensors",
    "read_model_file", "load_state_dict_strict", "format_keys", "OutputError", "check_output_folder",
]
