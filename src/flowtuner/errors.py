"""Typed errors. The library raises them; the CLI prints them as one line, without a traceback."""


class FlowtunerError(Exception):
    """A problem the user can fix (bad file, bad flag, missing package). Printed as one line."""


class WeightsError(FlowtunerError):
    """A checkpoint file that cannot be used for the slot it was given to."""


class ConfigError(FlowtunerError):
    """A flag or config value that is invalid."""
