"""Every exception hpcseg raises on purpose, in one tree.

Errors from paramiko, subprocess, HTTP and SimpleITK are translated once, at the boundary that meets them,
into one of these (``raise ... from exc``), so callers and the CLI catch ``HpcsegError`` alone::

    HpcsegError                  a sentence for the user (.message), what to do (.hint), may retrying help (.retryable)
    ├── ConfigError              a profile or config file value is wrong (names the key path)
    │   └── LimitExceeded        a request past a site limit (names the limit, the value asked, the contact)
    ├── ConnectionFailed         the login node cannot be reached or refuses us
    │   ├── HostKeyError         the host key is unknown (UnknownHostKey) or changed (ChangedHostKey)
    │   └── AuthenticationFailed no accepted key / agent / one-time code
    ├── CommandFailed            a command ran and exited non-zero (command, exit code, last lines of stderr)
    ├── TransferFailed           a file copy failed
    ├── SchedulerError           a scheduler command or its output is not what we expect
    │   └── SubmitFailed         the job was not submitted (no orphan is left behind)
    ├── TemplateError            a job template is missing, does not render, or fails ``bash -n``
    ├── JobError                 a job ended, failed to start, or cannot be found
    ├── ServerError              the inference server refused or failed a request (HTTP status kept)
    ├── ImageError               an image or mask cannot be read, or is unsuitable
    ├── ModelLoadError           a model folder cannot be loaded (bad manifest, weights, loader) — names why
    ├── DatasetError             a pair is refused, or the dataset on the cluster is inconsistent
    └── BatchError               a batch cannot be found, started or resumed (its folder, its state file)

The CLI prints ``str(error)`` as one line (plus the hint) and exits 1.
"""

from __future__ import annotations


class HpcsegError(Exception):
    """Base of every hpcseg error: a sentence for the user, a hint, and whether retrying can help."""

    retryable: bool = False

    def __init__(self, message: str, *, hint: str | None = None, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if retryable is not None:
            self.retryable = retryable

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(HpcsegError):
    """A configuration value is wrong; the message names the key path and what is allowed."""


class LimitExceeded(ConfigError):
    """A request outside a site bundle's limits, refused before anything is submitted."""

    def __init__(self, message: str, *, hint: str | None = None, limit: str = "", asked: object = None,
                 contact: str = "") -> None:
        super().__init__(message, hint=hint)
        self.limit = limit
        self.asked = asked
        self.contact = contact


class ConnectionFailed(HpcsegError):
    """The login node cannot be reached or refused the connection."""

    retryable = True


class HostKeyError(ConnectionFailed):
    """The server's host key could not be verified."""

    retryable = False

    def __init__(self, message: str, *, host: str, fingerprint: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.host = host
        self.fingerprint = fingerprint


class UnknownHostKey(HostKeyError):
    """The host is not in any known_hosts file."""


class ChangedHostKey(HostKeyError):
    """The host presents a key different from the one recorded: possibly an attack."""


class AuthenticationFailed(ConnectionFailed):
    """No authentication method was accepted."""

    retryable = False


class CommandFailed(HpcsegError):
    """A command exited non-zero. Formatted like invoke's UnexpectedExit: command, code, stderr tail."""

    def __init__(self, command: str, exit_code: int, stderr: str, *, hint: str | None = None) -> None:
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        msg = f"command `{command}` exited with {exit_code}"
        if tail:
            msg += ":\n    " + tail.replace("\n", "\n    ")
        super().__init__(msg, hint=hint)
        self.command = command
        self.exit_code = exit_code
        self.stderr = stderr


class TransferFailed(HpcsegError):
    """Copying a file to or from the cluster failed."""

    retryable = True


class SchedulerError(HpcsegError):
    """A scheduler command failed or printed something we cannot parse."""


class SubmitFailed(SchedulerError):
    """Submission failed; nothing was left queued."""


class TemplateError(HpcsegError):
    """A job template is missing, does not render, or is not valid bash."""


class JobError(HpcsegError):
    """A job could not be found, failed to start, or ended."""


class ServerError(HpcsegError):
    """The inference server refused or failed a request."""

    def __init__(self, message: str, *, status: int | None = None, hint: str | None = None,
                 retryable: bool | None = None) -> None:
        super().__init__(message, hint=hint, retryable=retryable)
        self.status = status


class ImageError(HpcsegError):
    """An image or mask is unreadable or unsuitable."""


class ModelLoadError(HpcsegError):
    """A model folder cannot be served: its manifest, weights or loader is wrong; the message names the reason."""


class DatasetError(HpcsegError):
    """An image-mask pair is refused, or the dataset is inconsistent."""


class BatchError(HpcsegError):
    """A batch (``hpcseg batch``) cannot be found, started or resumed: its output folder or state says why."""
