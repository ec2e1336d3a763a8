"""The SSH side: one pinned, key-only asyncssh connection to the backup server.

Everything here trusts exactly one host key (the one in the configuration), uses only
the in-memory private key it is handed, reads no OpenSSH config or agent, and turns
every remote argv into a command line in exactly one place (``remote_command``).
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, Protocol

import asyncssh

from zbackupd.errors import CommandError, PermanentError, TransientError
from zbackupd.zfs.parse import classify_error
from zbackupd.zfs.runner import CommandResult, CommandTimeout

#: AES-GCM first: roughly twice chacha20's throughput where AES-NI exists (design.md §5).
DEFAULT_ENCRYPTION_ALGS: tuple[str, ...] = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
)
#: Bytes in flight per channel: a WAN bandwidth-delay product, not asyncssh's 2 MiB.
DEFAULT_WINDOW = 16 * 1024 * 1024
#: The longest a non-streaming remote command may take (``[daemon]
#: stall_timeout_seconds`` in the daemon): a hung server must not hang the session.
DEFAULT_COMMAND_TIMEOUT = 300.0
#: How long a closing connection may take to say goodbye before its socket is dropped.
CLOSE_TIMEOUT = 10.0

#: Turns a failed remote command into the most specific typed error (the stderr parser).
Classifier = Callable[[Sequence[str], int, str], CommandError]


def plain_command_error(argv: Sequence[str], returncode: int, stderr: str) -> CommandError:
    """No classification: a permanent ``CommandError`` with the facts (for non-zfs commands)."""
    return CommandError(argv, returncode, stderr)


def remote_command(argv: Sequence[str]) -> str:
    """The ONE place a remote argv becomes a command line: every word shell-quoted.

    The server's gate splits it back with ``shlex.split``; no word can smuggle syntax.
    """
    words = tuple(argv)
    if not words:
        raise ValueError("a remote command needs at least one word")
    for word in words:
        if "\0" in word or "\n" in word:
            raise ValueError(f"remote argv word {word!r} contains a NUL or newline")
    return shlex.join(words)


class SourceLike(Protocol):
    """The connection part of a configured source (``zbackupd.config.Source``)."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def user(self) -> str: ...
    @property
    def host_key(self) -> str: ...
    @property
    def ciphers(self) -> tuple[str, ...]: ...
    @property
    def window_bytes(self) -> int: ...
    @property
    def keepalive_interval(self) -> float: ...
    @property
    def keepalive_count_max(self) -> int: ...


@dataclass(frozen=True, slots=True)
class SshTarget:
    """Where and how to reach the backup server (the source's connection settings)."""

    host: str
    user: str
    #: The server's public host key, OpenSSH format: ``ssh-ed25519 AAAA… [comment]``.
    host_key: str
    port: int = 22
    ciphers: tuple[str, ...] = DEFAULT_ENCRYPTION_ALGS
    window_bytes: int = DEFAULT_WINDOW
    keepalive_interval: float = 15.0
    #: Unanswered keepalives before the link counts as dropped (interval x count seconds).
    keepalive_count_max: int = 4
    connect_timeout: float = 30.0
    #: The bound of every ``RemoteHost.run`` that names none (streams have their own).
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT

    @classmethod
    def from_source(cls, source: SourceLike, **overrides: Any) -> SshTarget:
        """The target for a configured source; ``overrides`` for what config does not set."""
        settings: dict[str, Any] = {
            "host": source.host,
            "port": source.port,
            "user": source.user,
            "host_key": source.host_key,
            "ciphers": tuple(source.ciphers),
            "window_bytes": source.window_bytes,
            "keepalive_interval": source.keepalive_interval,
            "keepalive_count_max": source.keepalive_count_max,
        }
        settings.update(overrides)
        return cls(**settings)


class InvalidHostKey(PermanentError):
    """The configured host key is not a parsable OpenSSH public key line."""

    def __init__(self, host: str, reason: str) -> None:
        self.host = host
        self.reason = reason
        super().__init__(f"configured host key for {host} is not a public key: {reason}")


class HostKeyRejected(PermanentError):
    """The server did not prove possession of the ONE pinned host key.

    ``offered_fingerprint`` is None when the server offered no key we could see
    (for example, it has no key of the pinned key's type).
    """

    def __init__(
        self, host: str, port: int, expected_fingerprint: str, offered_fingerprint: str | None
    ) -> None:
        self.host = host
        self.port = port
        self.expected_fingerprint = expected_fingerprint
        self.offered_fingerprint = offered_fingerprint
        offered = offered_fingerprint or "no key of the pinned type"
        super().__init__(
            f"host key of {host}:{port} rejected: expected {expected_fingerprint}, "
            f"server offered {offered}"
        )


class AuthenticationRejected(PermanentError):
    """The server refused our key (not in ``authorized_keys``, or a wrong user)."""

    def __init__(self, host: str, port: int, username: str, reason: str) -> None:
        self.host = host
        self.port = port
        self.username = username
        self.reason = reason
        super().__init__(f"{host}:{port} refused key authentication as {username}: {reason}")


class NegotiationFailed(PermanentError):
    """No common SSH algorithm (cipher, kex); a configuration mismatch to fix by hand."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        self.host = host
        self.port = port
        self.reason = reason
        super().__init__(f"SSH negotiation with {host}:{port} failed: {reason}")


class RemoteUnavailable(TransientError):
    """The server could not be reached, or the connection or channel dropped."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        self.host = host
        self.port = port
        self.reason = reason
        super().__init__(f"SSH connection to {host}:{port} unavailable: {reason}")


class RemoteCommandTimeout(CommandTimeout):
    """A remote command did not finish in time: its channel was closed (transient)."""

    def __init__(self, host: str, port: int, argv: Sequence[str], timeout: float) -> None:
        self.host = host
        self.port = port
        super().__init__(argv, timeout)
        self.args = (f"{host}:{port}: {self.argv[0]} did not finish within {timeout:g}s "
                     "(channel closed)",)


def _pinned_key(target: SshTarget) -> asyncssh.SSHKey:
    try:
        return asyncssh.import_public_key(target.host_key.strip())
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise InvalidHostKey(target.host, str(exc)) from None


def client_options(
    target: SshTarget, client_key: asyncssh.SSHKey
) -> asyncssh.SSHClientConnectionOptions:
    """Everything the connection uses, said explicitly: the pinned host key, this one
    client key, no agent, no config file, no password, no compression."""
    pinned = _pinned_key(target)
    # One wildcard line: the key, not the name the server is reached by, is the identity.
    known_hosts = asyncssh.import_known_hosts(f"* {pinned.export_public_key().decode().strip()}\n")
    return asyncssh.SSHClientConnectionOptions(
        username=target.user,
        known_hosts=known_hosts,
        client_keys=[client_key],
        config=[],
        agent_path=None,
        agent_forwarding=False,
        password=None,
        password_auth=False,
        kbdint_auth=False,
        gss_auth=False,
        host_based_auth=False,
        preferred_auth=("publickey",),
        encryption_algs=list(target.ciphers),
        compression_algs=None,  # zfs streams are compressed already; zlib would cost CPU
        connect_timeout=target.connect_timeout,
        keepalive_interval=target.keepalive_interval,
        keepalive_count_max=target.keepalive_count_max,
        # asyncssh would look for ~/.ssh/ca-bundle.crt and ~/.ssh/crt: under the unit the
        # home is unreadable (ProtectHome=yes, no CAP_DAC_OVERRIDE) and looking fails.
        x509_trusted_certs=None,
        x509_trusted_cert_paths=[],
    )


class _PinnedClient(asyncssh.SSHClient):
    """Remembers a host key that was offered but not pinned, to name it in the error."""

    def __init__(self) -> None:
        self.offered_key: asyncssh.SSHKey | None = None
        #: Why the connection ended, once it has (e.g. keepalives unanswered).
        self.lost_reason: str | None = None

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.offered_key = key
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.lost_reason = getattr(exc, "reason", "") or str(exc) or type(exc).__name__


async def connect(
    target: SshTarget,
    client_key: asyncssh.SSHKey,
    *,
    classify: Classifier = classify_error,
) -> RemoteHost:
    """Open the connection; every failure becomes one of this module's typed errors.

    ``client_key`` is the already-decrypted private key object: no path, no agent.
    """
    pinned = _pinned_key(target)
    client = _PinnedClient()
    try:
        conn, _ = await asyncssh.create_connection(
            lambda: client, target.host, target.port, options=client_options(target, client_key)
        )
    except asyncssh.HostKeyNotVerifiable:
        offered = client.offered_key.get_fingerprint() if client.offered_key else None
        raise HostKeyRejected(target.host, target.port, pinned.get_fingerprint(), offered) from None
    except asyncssh.PermissionDenied as exc:
        raise AuthenticationRejected(target.host, target.port, target.user, exc.reason) from None
    except asyncssh.KeyExchangeFailed as exc:
        if "host key" in exc.reason.lower():
            raise HostKeyRejected(
                target.host, target.port, pinned.get_fingerprint(), None
            ) from None
        raise NegotiationFailed(target.host, target.port, exc.reason) from None
    except asyncssh.DisconnectError as exc:
        raise RemoteUnavailable(target.host, target.port, exc.reason) from None
    except OSError as exc:  # refused, unreachable, DNS, connect timeout (TimeoutError)
        raise RemoteUnavailable(target.host, target.port, str(exc) or type(exc).__name__) from None
    return RemoteHost(target, conn, classify, client)


class _CountingProcess(asyncssh.SSHClientProcess[bytes]):
    """A client process that counts stdout bytes as they arrive, without copying them."""

    def __init__(self) -> None:
        super().__init__()
        self.stdout_bytes = 0

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if datatype is None:
            self.stdout_bytes += len(data)
        super().data_received(data, datatype)


class RemoteStream:
    """A running remote command whose stdout flows into a local file object (a pipe)."""

    def __init__(self, host: RemoteHost, argv: tuple[str, ...], process: _CountingProcess) -> None:
        self._host = host
        self.argv = argv
        self._process = process

    @property
    def bytes_received(self) -> int:
        """Stdout bytes received from the network so far (may lead the pipe by the window)."""
        return self._process.stdout_bytes

    async def wait(self) -> CommandResult:
        """Wait for the remote exit; a channel closed without an exit status is a drop."""
        try:
            completed = await self._process.wait(check=False)
        except (asyncssh.DisconnectError, asyncssh.ChannelOpenError, OSError) as exc:
            raise self._host.unavailable(exc) from None
        return self._host.completed(self.argv, completed)

    def abort(self) -> None:
        """Close the channel: sshd then closes the remote command's stdout (EPIPE/SIGPIPE)."""
        self._process.close()

    async def wait_closed(self) -> None:
        """Wait until the channel and its local redirect targets are closed."""
        await self._process.wait_closed()


class RemoteHost:
    """An open connection to the backup server; runs argv commands there."""

    def __init__(
        self,
        target: SshTarget,
        conn: asyncssh.SSHClientConnection,
        classify: Classifier,
        client: _PinnedClient | None = None,
    ) -> None:
        self.target = target
        self._conn = conn
        self._classify = classify
        self._client = client
        #: The first sign that this connection is gone (a drop, keepalives unanswered):
        #: what made a command or stream fail, for the session's retry decision.
        self.link_failure: RemoteUnavailable | None = None

    @property
    def negotiated_cipher(self) -> str:
        """The cipher the server sends with (what the stream's throughput depends on)."""
        return str(self._conn.get_extra_info("recv_cipher", ""))

    async def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float | None = None
    ) -> CommandResult:
        """Run ``argv`` remotely to completion; raise the classified error when ``check``.

        Bounded by ``timeout``, by default the target's ``command_timeout``: a command
        that takes longer has its channel closed and raises ``RemoteCommandTimeout``.
        """
        words = tuple(argv)
        limit = self.target.command_timeout if timeout is None else timeout
        try:
            completed = await self._conn.run(
                remote_command(words),
                check=False,
                timeout=limit,
                encoding=None,
                stdin=asyncssh.DEVNULL,
                window=self.target.window_bytes,
            )
        except asyncssh.TimeoutError:
            raise RemoteCommandTimeout(self.target.host, self.target.port, words, limit) from None
        except (asyncssh.DisconnectError, asyncssh.ChannelOpenError, OSError) as exc:
            raise self.unavailable(exc) from None
        result = self.completed(words, completed)
        if check and result.returncode != 0:
            raise self.classify(words, result.returncode, result.stderr)
        return result

    def classify(self, argv: Sequence[str], returncode: int, stderr: str) -> CommandError:
        """The typed error for a remote command that failed (the configured classifier)."""
        return self._classify(argv, returncode, stderr)

    async def start_stream(self, argv: Sequence[str], stdout: IO[bytes]) -> RemoteStream:
        """Start ``argv`` with its stdout redirected into ``stdout`` (the write end of a pipe).

        asyncssh takes ownership of ``stdout`` and closes it when the channel ends; the
        pipe's fill level then throttles the channel window: real backpressure.
        """
        words = tuple(argv)
        try:
            process = _CountingProcess()
            await self._conn.create_session(
                lambda: process,
                remote_command(words),
                encoding=None,
                window=self.target.window_bytes,
            )
            await process.redirect(asyncssh.DEVNULL, stdout, asyncssh.PIPE)
        except (asyncssh.DisconnectError, asyncssh.ChannelOpenError, OSError) as exc:
            raise self.unavailable(exc) from None
        return RemoteStream(self, words, process)

    def completed(
        self, argv: tuple[str, ...], completed: asyncssh.SSHCompletedProcess
    ) -> CommandResult:
        """Turn asyncssh's result into ours; no exit status at all means the link dropped."""
        if completed.returncode is None:
            lost = self._client.lost_reason if self._client is not None else None
            raise self._lost(f"{argv[0]}: channel closed without exit status"
                             + (f" ({lost})" if lost else ""))
        stdout = completed.stdout if isinstance(completed.stdout, bytes) else b""
        stderr_raw = completed.stderr if isinstance(completed.stderr, bytes) else b""
        return CommandResult(
            argv, completed.returncode, stdout, stderr_raw.decode("utf-8", "replace")
        )

    def unavailable(self, exc: BaseException) -> RemoteUnavailable:
        reason = getattr(exc, "reason", "") or str(exc) or type(exc).__name__
        return self._lost(str(reason))

    def _lost(self, reason: str) -> RemoteUnavailable:
        error = RemoteUnavailable(self.target.host, self.target.port, reason)
        if self.link_failure is None:
            self.link_failure = error
        return error

    def close(self) -> None:
        self._conn.close()

    async def wait_closed(self) -> None:
        await self._conn.wait_closed()

    async def __aenter__(self) -> RemoteHost:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Close; a link that is gone cannot take the goodbye (the kernel would keep
        retransmitting it for many minutes): after ``CLOSE_TIMEOUT`` the socket is dropped."""
        self.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.wait_closed()
        except TimeoutError:
            self._conn.abort()
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.wait_closed()
