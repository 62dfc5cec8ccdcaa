"""timm's transform strings (the `aa` policy, interpolation names), checked when the config is read.

timm parses an augmentation policy only when the transform is built, and skips what it does not understand:
`rand-m9-mstd0.5-garbage` builds RandAugment m9 mstd0.5 without a word. Here every section must be one timm
knows, with a value of its type, and timm must then build the transform.
"""

from __future__ import annotations

import re

from ..errors import ConfigError
from ..fields import did_you_mean

__all__ = ["check_augment_policy", "check_interpolation", "INTERPOLATIONS"]

# The sections of each policy family, as timm's parsers read them: key -> value type ("rand-m9-n2-mstd0.5").
# RandAugment also takes "t<name>", the transform set (e.g. "tweights").
_SECTIONS: dict[str, dict[str, type]] = {
    "rand": {"m": int, "n": int, "p": float, "mstd": float, "mmax": int, "inc": int},
    "augmix": {"m": int, "w": int, "d": int, "a": float, "b": int, "mstd": float},
    **{policy: {"mstd": float} for policy in ("original", "originalr", "v0", "v0r", "3a")},  # AutoAugment
}
# RandAugment's transform sets ("t<name>"), as timm's rand_augment_choices reads them: any other name silently
# gives the default set.
_RAND_TRANSFORM_SETS = ("weights", "3aw", "3a")
_BUILDERS = {"rand": "rand_augment_transform", "augmix": "augment_and_mix_transform"}  # timm.data.auto_augment's
EXAMPLES = 'e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original-mstd0.5, or "" for none'
# Names timm's transforms resolve for both training and evaluation ("random" is training-only).
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "hamming", "box")


def check_augment_policy(aa: str) -> None:
    """ConfigError (one line) unless `aa` is empty or a policy timm builds exactly as written."""
    if not aa:
        return
    family, *sections = aa.split("-")
    if family not in _SECTIONS:
        hint = did_you_mean(family, _SECTIONS) or f"the policies are {', '.join(_SECTIONS)}"
        raise ConfigError(f"aa {aa!r} is not a timm augmentation policy: unknown policy {family!r}; {hint} "
                          f"({EXAMPLES})")
    keys = _SECTIONS[family]
    for section in sections:
        if family == "rand" and section.startswith("t") and section[1:] in _RAND_TRANSFORM_SETS:
            continue
        match = re.fullmatch(r"([a-z]+)(\d.*)", section)
        if match is None or match[1] not in keys:
            key = match[1] if match else section
            takes = [*keys, *(f"t{name}" for name in _RAND_TRANSFORM_SETS if family == "rand")]
            hint = did_you_mean(key, keys) or f"{family} takes {', '.join(takes)}"
            raise ConfigError(f"aa {aa!r}: unknown section {section!r}; {hint} ({EXAMPLES})")
        try:
            keys[match[1]](match[2])
        except ValueError:
            kind = "an integer" if keys[match[1]] is int else "a number"
            raise ConfigError(f"aa {aa!r}: section {section!r} needs {kind} after {match[1]!r}") from None
    from timm.data import auto_augment  # here, not at the top: the command line (and --help) imports no timm

    try:
        getattr(auto_augment, _BUILDERS.get(family, "auto_augment_transform"))(aa, None)
    except (AssertionError, ValueError, KeyError) as e:  # timm asserts on what it cannot build
        raise ConfigError(f"aa {aa!r} is not a timm augmentation policy ({e}); {EXAMPLES}") from None


def check_interpolation(name: str) -> None:
    """ConfigError unless timm resolves `name` as a resize interpolation."""
    from timm.data.transforms import str_to_interp_mode

    try:
        if name not in INTERPOLATIONS:
            raise KeyError(name)
        str_to_interp_mode(name)
    except KeyError:
        hint = did_you_mean(name, INTERPOLATIONS)
        raise ConfigError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {name!r}"
                          + (f"; {hint}" if hint else "")) from None
