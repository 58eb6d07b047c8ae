"""Exceptions of the adapter registry, each carrying the CLI exit code it maps to.

One exception class per kind of failure lets callers (the CLI, the serving layer) react without parsing
messages, and the message itself always names the offending thing (file, tensor key, shape, ref, token id).
"""

from __future__ import annotations

# Exit codes of `kvrun-adapters`; docs/registry.md and `--help` list the same table.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_REJECTED = 4
EXIT_AUTH = 5
EXIT_CONFLICT = 6
EXIT_UNREACHABLE = 7
EXIT_INTEGRITY = 8

EXIT_CODES_HELP = """exit codes:
  0  success
  1  unexpected error
  2  usage error (bad arguments, malformed name, ref or tag)
  3  not found (adapter, version, tag, token or base model)
  4  adapter rejected by validation (nothing was stored)
  5  authentication or authorization failed: token, or Redis credentials (nothing was changed)
  6  conflict (token init on a registry with tokens, revoking the last admin token, write contention)
  7  registry unreachable (Redis down, directory not writable)
  8  integrity error (checksum mismatch or missing chunk while pulling)"""


class RegistryError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = EXIT_ERROR


class UsageError(RegistryError):
    """A malformed argument: name, ref, tag, scope, URL."""

    exit_code = EXIT_USAGE


class NotFoundError(RegistryError):
    exit_code = EXIT_NOT_FOUND


class ConflictError(RegistryError):
    exit_code = EXIT_CONFLICT


class AuthError(RegistryError):
    exit_code = EXIT_AUTH


class UnreachableError(RegistryError):
    exit_code = EXIT_UNREACHABLE


class IntegrityError(RegistryError):
    """Stored data does not match its recorded sha256 (or a chunk is gone)."""

    exit_code = EXIT_INTEGRITY


class MissingChunksError(IntegrityError):
    """Raised by a backend's publish when chunks vanished between upload and publish (e.g. a concurrent GC).

    The push re-uploads them and retries, so users only see this if it keeps happening.
    """

    def __init__(self, shas: list[str]) -> None:
        super().__init__(f"{len(shas)} chunk(s) missing at publish: {', '.join(s[:12] for s in shas[:4])}")
        self.shas = shas


class ValidationError(RegistryError):
    """The adapter was rejected at push; nothing was stored."""

    exit_code = EXIT_REJECTED


class UnsafeFormatError(ValidationError):
    """A pickle-based file (.bin/.pt/.pth/.pkl/.ckpt) was offered."""


class MissingFileError(ValidationError):
    pass


class FileTooLargeError(ValidationError):
    pass


class SafetensorsFormatError(ValidationError):
    """The safetensors header or data layout is malformed."""


class AdapterConfigError(ValidationError):
    """adapter_config.json is malformed or has an invalid value."""


class UnsupportedConfigError(ValidationError):
    """adapter_config.json asks for a PEFT feature the serving engine does not implement."""


class TensorNameError(ValidationError):
    """A tensor key does not follow PEFT's LoRA naming or targets an undeclared module."""


class TensorShapeError(ValidationError):
    pass


class RankError(ValidationError):
    pass


class DtypeError(ValidationError):
    pass


class NonFiniteError(ValidationError):
    """A weight is NaN or +-Inf."""


class WeightMagnitudeError(ValidationError):
    """A weight is finite but far larger than any trained LoRA weight (see validate.LORA_MAGNITUDE_BOUND)."""


class BaseModelMismatchError(ValidationError):
    """The adapter's shapes do not fit the base model config known to the registry."""
