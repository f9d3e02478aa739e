"""Development credentials for a deployment: a CA, the SuperLink's TLS certificate, SuperNode auth keys.

    python -m aisec_train.federated.credentials OUT_DIR --host 10.0.0.5 --nodes 4

writes ``ca.crt``, ``superlink.crt``/``superlink.key`` (valid for ``--host``, localhost and 127.0.0.1) and
``supernode_<i>`` (OpenSSH EC P-384 private key, mode 0600) with ``supernode_<i>.pub`` to register on the
SuperLink (``flwr supernode register``). Private keys are written owner-only. Production sites should
take their certificates from their own PKI; this exists so the documented TLS + authentication commands
(docs/federated.md) and the deployment test run anywhere.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from aisec_train.errors import RefusingParser
from aisec_train.store.files import atomic_write

MAX_DAYS = 36500  # a hundred years: cryptography's dates end at year 9999


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    # The store's safe-write path: temp + fsync + rename, never through a symlink, owner-only from creation.
    atomic_write(path, data, root=path.parent, perms=0o600 if private else 0o644)
    return path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _san(host: str) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(list(dict.fromkeys(names)))


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_tls(out: Path, host: str, days: int = 30) -> dict[str, Path]:
    """A CA and a SuperLink certificate signed by it, valid for ``host`` (IP or DNS name) and loopback."""
    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("aisec-train federation CA"))
        .issuer_name(_name("aisec-train federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(host))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(host), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    out.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    return {
        "ca": _write(out / "ca.crt", ca.public_bytes(pem)),
        "cert": _write(out / "superlink.crt", cert.public_bytes(pem)),
        "key": _write(out / "superlink.key", _pem_key(key), private=True),
    }


def write_node_key(out: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair (OpenSSH format, NIST P-384, as ``flower-supernode`` reads it)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    out.mkdir(parents=True, exist_ok=True)
    return _write(out / name, private, private=True), _write(out / f"{name}.pub", public + b"\n")


def main(argv: list[str] | None = None) -> None:
    # Usage errors and out-of-range values are one line and exit 2 (errors.RefusingParser), before anything is
    # written: --days -5 and --host '' were tracebacks from cryptography, --days 0 a certificate already expired.
    parser = RefusingParser(prog="aisec_train.federated.credentials", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--host", default="127.0.0.1", help="the SuperLink's address as SuperNodes dial it")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args(argv)
    if not 1 <= len(args.host) <= 64 or any(c.isspace() for c in args.host):
        parser.error(f"--host {args.host!r} is not allowed: a host name or IP address of 1-64 characters, no spaces")
    if args.nodes < 0:
        parser.error(f"--nodes {args.nodes} is not allowed: must be >= 0 (one key pair per SuperNode)")
    if not 1 <= args.days <= MAX_DAYS:
        parser.error(f"--days {args.days} is not allowed: must be in [1, {MAX_DAYS}] (how long the certificates last)")
    for name, path in write_tls(args.out, args.host, args.days).items():
        print(f"{name}: {path}")
    for i in range(args.nodes):
        private, public = write_node_key(args.out, f"supernode_{i}")
        print(f"supernode {i}: {private} (register {public})")


if __name__ == "__main__":
    main()
