"""One error hierarchy. Raised with context, caught at the edges (CLI, worker loops)."""

from __future__ import annotations

# Exit codes of every command: success; some inputs could not be inspected (their error
# records were written); usage, configuration or model error; interrupted.
EXIT_OK, EXIT_INPUT_ERRORS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class StationError(Exception):
    """Base of every error station raises on purpose."""


class ConfigError(StationError):
    """A configuration file or option is invalid. The message names file, line and field."""


class ModelError(StationError):
    """A model file is missing, unreadable, has no card, or does not match its card."""


class InputError(StationError):
    """An input (image, video frame) cannot be decoded or has an unsupported format."""


class CameraError(StationError):
    """A frame source cannot be opened or stopped delivering frames."""


class PublishError(StationError):
    """A result could not be handed to a sink (MQTT broker, file)."""
