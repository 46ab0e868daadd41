"""The reward model's normalization: its raw score is read as ``(raw + bias) * scale``.

The reward stage measures bias and scale on the SFT policy's own samples (mean 0, std 1 there)
and records them in its manifest's extras (``norm_bias``, ``norm_scale``, ``norm_samples``) and,
for loaders outside the pipeline, in ``model/config.json`` under ``reward_normalization``.
Every reader (PPO's reward, eval's RM score, the reward stage's own samples, the model card,
the report and ``pipeline.hub.RewardScorer``) goes through ``RewardNormalization``: a missing or
non-numeric entry is an error naming the file, never a silent "unnormalized".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import PipelineError
from pipeline.files import MANIFEST


class StageFolder(Protocol):
    """What ``of`` reads of a finished stage (``pipeline.rundir.Parent``); a protocol, so this
    module stays below rundir, which the hub (and so this) sits under."""

    path: Path
    extras: dict[str, Any]

# Under this key of a reward model's config.json.
NORMALIZATION_KEY = "reward_normalization"
# The manifest's extras keys, by field.
EXTRAS_KEYS = {"bias": "norm_bias", "scale": "norm_scale", "samples": "norm_samples"}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class RewardNormalization:
    """How a reward model's raw score becomes the reward PPO reads (before its clip)."""

    # Added to the raw score: minus its mean on the SFT policy's samples.
    bias: float
    # Multiplies the shifted score: one over the samples' std (1 when that std is 0).
    scale: float
    # SFT samples it was measured on; 0 = not measured (bias 0, scale 1).
    samples: int

    @classmethod
    def unmeasured(cls) -> RewardNormalization:
        """The identity, recorded when ``rm.norm_samples`` is 0."""
        return cls(0.0, 1.0, 0)

    def apply(self, raw):
        """The normalized score of a raw one (a float or a tensor)."""
        return (raw + self.bias) * self.scale

    def as_extras(self) -> dict[str, float | int]:
        """The manifest's form."""
        return {EXTRAS_KEYS[name]: getattr(self, name) for name in EXTRAS_KEYS}

    @classmethod
    def from_extras(cls, extras: dict, where: str | Path) -> RewardNormalization:
        """Read from a manifest's extras; ``where`` (the manifest file) names a problem."""
        return cls._read(extras, EXTRAS_KEYS, f"{where}: extras", "the rm stage records it "
                         "(re-run it)")

    @classmethod
    def of(cls, parent: StageFolder) -> RewardNormalization:
        """The normalization a finished rm stage recorded."""
        return cls.from_extras(parent.extras, parent.path / MANIFEST)

    def store_in(self, model_config) -> None:
        """Put it into a transformers config, saved with the model."""
        setattr(model_config, NORMALIZATION_KEY, {"bias": self.bias, "scale": self.scale,
                                                  "samples": self.samples,
                                                  "formula": "(score + bias) * scale"})

    @classmethod
    def from_model_config(cls, model_config, where: str | Path) -> RewardNormalization:
        """Read from a transformers config; ``where`` is the model folder."""
        stored = getattr(model_config, NORMALIZATION_KEY, None)
        if not isinstance(stored, dict):
            raise PipelineError(
                f"{where}: config.json has no {NORMALIZATION_KEY!r} (a mid-run checkpoint, or "
                "a reward model saved before it was stored); use RewardScorer.raw for "
                "unnormalized scores")
        return cls._read(stored, {name: name for name in EXTRAS_KEYS},
                         f"{where}/config.json: {NORMALIZATION_KEY}", "the rm stage stores it")

    @classmethod
    def _read(cls, values: dict, keys: dict[str, str], where: str,
              remedy: str) -> RewardNormalization:
        missing = [key for key in keys.values() if key not in values]
        if missing:
            raise PipelineError(f"{where} has no {', '.join(missing)}: the reward model's "
                                f"normalization, which {remedy}")
        for key in keys.values():
            if not _number(values[key]):
                raise PipelineError(f"{where}.{key} is {values[key]!r}; expected a number")
        return cls(float(values[keys["bias"]]), float(values[keys["scale"]]),
                   int(values[keys["samples"]]))
