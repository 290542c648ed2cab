"""A restricted unpickler for FLAME ``.pkl`` model files.

FLAME ships as a Python-2 pickle holding numpy arrays, a ``scipy.sparse.csc_matrix``
(``J_regressor``) and ``chumpy.Ch`` objects (``shapedirs``, ``posedirs`` ...). A pickle can run
arbitrary code on load, so this loader admits only the few globals those files need and maps
them to inert containers: numpy's array reconstruction, ``copyreg._reconstructor`` on the inert
classes, and stand-ins for the chumpy and scipy.sparse classes that merely store their state.
Anything else — ``os.system``, ``builtins.eval``, any other class — is refused with
:class:`UnsafePickleError` before it is imported or called.
"""

from __future__ import annotations

import _codecs
import copyreg
import pickle
from pathlib import Path

import numpy as np

from gem_jax.errors import SubjectFormatError

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray


class UnsafePickleError(SubjectFormatError, pickle.UnpicklingError):
    """A pickle asked for a global outside the FLAME allow-list (a :class:`SubjectFormatError`)."""


class _ChumpyState:
    """Inert stand-in for ``chumpy.ch.Ch`` and friends: keeps the pickled state only."""

    def __setstate__(self, state):
        self.state = state

    def to_array(self) -> np.ndarray:
        state = self.state
        if isinstance(state, dict):
            for key in ("x", "_x", "a"):
                if key in state:
                    value = state[key]
                    return value.to_array() if isinstance(value, _ChumpyState) else np.asarray(value)
        raise pickle.UnpicklingError("chumpy object without array state 'x'")


class _SparseState:
    """Inert stand-in for ``scipy.sparse`` CSC/CSR matrices: keeps the pickled ``__dict__``."""

    def __setstate__(self, state):
        self.state = state

    def to_array(self) -> np.ndarray:
        s = self.state
        try:
            data, indices, indptr = (np.asarray(s[k]) for k in ("data", "indices", "indptr"))
            shape = tuple(s.get("_shape", s.get("shape")))
        except (KeyError, TypeError) as err:
            raise pickle.UnpicklingError(f"sparse matrix state is missing {err}") from err
        fmt = s.get("format", getattr(self, "fmt", "csc"))
        dense = np.zeros(shape, dtype=data.dtype)
        for outer in range(len(indptr) - 1):
            rows = indices[indptr[outer]:indptr[outer + 1]]
            vals = data[indptr[outer]:indptr[outer + 1]]
            if fmt == "csr":
                dense[outer, rows] = vals
            else:
                dense[rows, outer] = vals
        return dense


class _CsrState(_SparseState):
    fmt = "csr"


def _numpy_reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"refused ndarray subclass {subtype!r}")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _safe_reconstructor(cls, base, state):
    if cls not in (_ChumpyState, _SparseState, _CsrState) or base is not object:
        raise UnsafePickleError(f"refused copyreg reconstruction of {cls!r}")
    return copyreg._reconstructor(cls, base, state)


_ALLOWED: dict[tuple[str, str], object] = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = _numpy_reconstruct
    _ALLOWED[(_mod, "scalar")] = _multiarray.scalar
for _mod in ("numpy", "numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_mod, "ndarray")] = np.ndarray
    _ALLOWED[(_mod, "dtype")] = np.dtype
for _mod in ("copy_reg", "copyreg"):
    _ALLOWED[(_mod, "_reconstructor")] = _safe_reconstructor
for _mod in ("__builtin__", "builtins"):
    _ALLOWED[(_mod, "object")] = object
    _ALLOWED[(_mod, "set")] = set
    _ALLOWED[(_mod, "frozenset")] = frozenset
_ALLOWED[("_codecs", "encode")] = _codecs.encode  # bytes in protocol-2 pickles written by Python 3
for _name in ("Ch", "Select", "Concatenate"):
    _ALLOWED[("chumpy.ch", _name)] = _ChumpyState
_ALLOWED[("chumpy.reordering", "Select")] = _ChumpyState
_ALLOWED[("chumpy.reordering", "Concatenate")] = _ChumpyState
for _mod in ("scipy.sparse.csc", "scipy.sparse._csc"):
    _ALLOWED[(_mod, "csc_matrix")] = _SparseState
for _mod in ("scipy.sparse.csr", "scipy.sparse._csr"):
    _ALLOWED[(_mod, "csr_matrix")] = _CsrState


class ArrayUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals (see module docstring)."""

    def find_class(self, module: str, name: str):
        target = _ALLOWED.get((module, name))
        if target is None:
            raise UnsafePickleError(
                f"refused to load global {module}.{name}: only numpy, "
                "scipy.sparse and chumpy array state may be unpickled"
            )
        return target


def _to_plain(value):
    if isinstance(value, (_ChumpyState, _SparseState)):
        return value.to_array()
    return value


def load_flame_pickle(path: str | Path) -> dict:
    """Read a FLAME ``.pkl`` into a dict of numpy arrays, refusing anything unsafe."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = ArrayUnpickler(fh, encoding="latin1").load()
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{path}: {err}") from None
    except Exception as err:  # truncated, garbage, or a pickle of something else: all unreadable
        raise SubjectFormatError(f"{path}: not a readable FLAME pickle ({type(err).__name__}: {err})") from err
    if not isinstance(raw, dict):
        raise SubjectFormatError(f"{path}: expected a dict of arrays, got {type(raw).__name__}")
    try:
        return {str(k): _to_plain(v) for k, v in raw.items()}
    except Exception as err:
        raise SubjectFormatError(f"{path}: not a readable FLAME pickle ({type(err).__name__}: {err})") from err
