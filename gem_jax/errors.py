"""The error types of gem_jax's boundaries (docs/architecture.md §10).

Every value that enters gem_jax is checked where it enters, and each boundary has one error
type, so a caller can catch "bad subject data" apart from "a corrupt model file" apart from
"a wrong config value". Each message names the file (or config field), the field inside it,
what was expected and what was found.

=========================  ==============================================================
:class:`SubjectFormatError` what the user brings: a subject export (``transforms_*.json``,
                            images, masks, ``flame_param/*.npz``) and the head model
                            (FLAME ``.pkl`` / ``.npz``)
:class:`ConfigError`        a config value out of its range, or inconsistent with another
                            (checked once, before any stage runs)
:class:`ArtefactError`      a file a stage wrote for a later one (``gem.npz``, ``coeffs.npy``,
                            ``roots.npy``, the collect matrices, the regressor, checkpoints)
                            that is missing, truncated or otherwise unreadable;
                            :class:`MissingArtefactError` (also a ``FileNotFoundError``) when
                            it is absent
:class:`CoefficientError`   eigen coefficients that are not finite (beyond ±3σ they are
                            clamped with a warning instead, ``gem_jax.eigen.model``)
=========================  ==============================================================

All are ``ValueError`` subclasses, so code that caught ``ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["ArtefactError", "CoefficientError", "ConfigError", "MissingArtefactError", "SubjectFormatError"]


class SubjectFormatError(ValueError):
    """Subject data or a head model that does not follow docs/data_format.md (names file and field)."""


class ConfigError(ValueError):
    """A config value that is out of range or inconsistent (names the field, expected and found)."""


class ArtefactError(ValueError):
    """A file written by a pipeline stage is unreadable or malformed (names the file, the field and
    the stage that writes it)."""


class MissingArtefactError(ArtefactError, FileNotFoundError):
    """A file a stage needs from an earlier stage does not exist (names the stage to run)."""


class CoefficientError(ValueError):
    """Eigen coefficients with NaN or Inf values (names the modality and the entries)."""
