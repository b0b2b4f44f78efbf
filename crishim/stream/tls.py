"""TLS for the stream server: a given certificate (reloaded when its files change) or a
self-signed one made at start; ALPN offers h2 and http/1.1."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import ssl
import tempfile

from crishim.config import Config

log = logging.getLogger("crishim.tls")

ALPN_PROTOCOLS = ["h2", "http/1.1"]
RELOAD_CHECK_SECONDS = 2.0


def _new_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # HTTP/2 requires TLS 1.2 or later
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.set_alpn_protocols(ALPN_PROTOCOLS)
    return ctx


def server_context(config: Config) -> ssl.SSLContext:
    """The stream server's context. With tls_cert_file/tls_key_file the files are watched
    and reloaded into this same context, so new handshakes see a renewed certificate while
    live sessions carry on; without them a self-signed certificate is made."""
    ctx = _new_context()
    if config.tls_cert_file:
        reloader = CertificateReloader(ctx, config.tls_cert_file, config.tls_key_file)
        reloader.load()
        reloader.start()
        ctx.crishim_reloader = reloader  # type: ignore[attr-defined]  # keeps it alive
        return ctx
    cert_pem, key_pem, fingerprint = self_signed(_names(config))
    _load_pem(ctx, cert_pem, key_pem)
    log.info("stream server TLS: self-signed certificate, SHA-256 fingerprint %s", fingerprint)
    return ctx


def _load_pem(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """load_cert_chain reads only files: hand it a private temporary pair."""
    with tempfile.TemporaryDirectory(prefix="crishim-tls-") as d:
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        with open(os.open(cert, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(cert_pem)
        with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
            f.write(key_pem)
        ctx.load_cert_chain(cert, key)


def _names(config: Config) -> list[str]:
    names = ["localhost", "127.0.0.1", "::1"]
    for host in (config.stream_url_host, config.stream_server_address):
        host = host.strip("[]")
        if host and host not in ("0.0.0.0", "::") and host not in names:
            names.append(host)
    return names


def self_signed(names: list[str], days: int = 365) -> tuple[bytes, bytes, str]:
    """(certificate PEM, key PEM, SHA-256 fingerprint) for a P-256 self-signed certificate
    valid for names (DNS names or IP addresses)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0]),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "crishim")])
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert_pem, key_pem, cert.fingerprint(hashes.SHA256()).hex(":")


class CertificateReloader:
    """Checks the certificate and key files every few seconds; on a change loads them into
    the same SSLContext (new handshakes only; live sessions keep theirs). A pair that does
    not load (say, caught mid-rotation) is logged and retried at the next check."""

    def __init__(self, ctx: ssl.SSLContext, cert_file: str, key_file: str,
                 interval: float = RELOAD_CHECK_SECONDS) -> None:
        self.ctx = ctx
        self.cert_file = cert_file
        self.key_file = key_file
        self.interval = interval
        self.loaded: tuple[tuple[int, int, int], ...] | None = None
        self.reloads = 0
        self._timer: asyncio.TimerHandle | None = None

    def _signature(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for path in (self.cert_file, self.key_file):
            st = os.stat(path)
            out.append((st.st_mtime_ns, st.st_ino, st.st_size))
        return tuple(out)

    def load(self) -> None:
        """Load now; errors propagate (at start a bad certificate must stop crishim)."""
        signature = self._signature()
        self.ctx.load_cert_chain(self.cert_file, self.key_file)
        self.loaded = signature

    def start(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            log.warning("stream server TLS: no event loop; %s will not be reloaded",
                        self.cert_file)
            return
        self._timer = loop.call_later(self.interval, self._check)

    def _check(self) -> None:
        try:
            if self._signature() != self.loaded:
                self.load()
                self.reloads += 1
                log.info("stream server TLS: reloaded certificate %s", self.cert_file)
        except (OSError, ssl.SSLError) as e:
            log.warning("stream server TLS: cannot reload %s / %s (keeping the old "
                        "certificate, retrying): %s", self.cert_file, self.key_file, e)
        self._timer = asyncio.get_running_loop().call_later(self.interval, self._check)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
