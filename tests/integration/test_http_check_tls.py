"""The HTTP check port's mTLS files are followed without a restart (authz/httpcheck/tls.py):
a rotated certificate is served from the next connection; a half-written one is not."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from authz.errors import AuthzError
from authz.httpcheck.tls import ReloadingContext
from authz.tls import TlsFiles
from tests.support.certs import TestCA

pytestmark = pytest.mark.integration


async def _served_name(server_ctx: ssl.SSLContext, client: ssl.SSLContext) -> str:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ok")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client,
                                                       server_hostname="authz")  # fmt: skip
        assert await reader.read() == b"ok"
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    cn = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(
        x509.NameOID.COMMON_NAME
    )[0].value
    return str(cn)


async def test_rotated_certificate_is_served_from_the_next_connection(tmp_path: Path) -> None:
    ca = TestCA()
    ca.write(tmp_path / "ca.crt")
    ca.issue("authz", server=True, dns=("authz",)).write(tmp_path, "server")
    client_cert, client_key = ca.issue("gateway").write(tmp_path, "gateway")
    files = TlsFiles(str(tmp_path / "server.crt"), str(tmp_path / "server.key"),
                     str(tmp_path / "ca.crt"))  # fmt: skip
    ctx = ReloadingContext(files)
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    client.load_cert_chain(str(client_cert), str(client_key))
    assert await _served_name(ctx.context, client) == "authz"
    # Half-written: a new certificate beside the old key. Kept out; the old one serves.
    ca.issue("authz-next", server=True, dns=("authz",)).write(tmp_path / "next", "server")
    (tmp_path / "server.crt").write_bytes((tmp_path / "next" / "server.crt").read_bytes())
    assert await _served_name(ctx.context, client) == "authz"
    assert ctx.reloads == 0
    (tmp_path / "server.key").write_bytes((tmp_path / "next" / "server.key").read_bytes())
    # A broken set is tried again at most once a second: each handshake asks.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while await _served_name(ctx.context, client) != "authz-next":
        assert loop.time() < deadline, "the rotated certificate was never served"
    assert ctx.reloads == 1


def test_unreadable_files_are_one_error_at_start(tmp_path: Path) -> None:
    with pytest.raises(AuthzError, match="tls \\(HTTP check port\\): cannot load"):
        ReloadingContext(TlsFiles(str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")))
