#!/usr/bin/env python3
"""A second-language client of tokenwarden's gRPC API: stock grpcio, a plain `unix:` target.

Generates Python stubs from proto/tokenwarden/v1/tokenwarden.proto with grpcio-tools into a
temporary directory (nothing generated is committed), then talks to a running daemon over its
Unix socket through `grpc.insecure_channel("unix:" + path)` with no channel options, exactly as
a user's program would. Stock grpcio sends the percent-encoded socket path as `:authority`;
tokenwarden must accept it (docs/grpc.md#serving, "Any gRPC client works with a plain `unix:` target").

Usage: client_test.py SOCKET CLIENT [--failing NAME]

CLIENT must be a client the daemon serves with short-lived tokens (a few seconds, so WatchToken
sees a second token quickly). With --failing, NAME is a client whose provider cannot be reached:
its GetToken must answer UNAVAILABLE at once.

Prints one line per check (`ok   NAME: ...` or `FAIL NAME: ...`), then a summary line, and
exits 1 when any check failed. Tokens are never printed, only their fingerprints (the first 8
hex digits of their SHA-256, as tokenwarden itself names them).

Requirements: tests/python/requirements.txt (scripts/test.sh installs them into .venv).
"""

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time

import grpc

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_ROOT = os.path.join(REPO, "proto")
PROTO_FILE = "tokenwarden/v1/tokenwarden.proto"
SERVICE = "tokenwarden.v1.TokenService"


def fingerprint(token: str) -> str:
    """The first 8 hex digits of the token's SHA-256: how tokenwarden names a token."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


def seconds(ts) -> float:
    """A google.protobuf.Timestamp as Unix seconds."""
    return ts.seconds + ts.nanos / 1e9


def generate_stubs(out_dir: str):
    """Runs grpcio-tools' protoc on the proto file and imports the generated modules."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I" + PROTO_ROOT,
            "--python_out=" + out_dir,
            "--grpc_python_out=" + out_dir,
            PROTO_FILE,
        ],
        check=True,
    )
    sys.path.insert(0, out_dir)
    from tokenwarden.v1 import tokenwarden_pb2, tokenwarden_pb2_grpc

    return tokenwarden_pb2, tokenwarden_pb2_grpc


class Checks:
    """Runs named checks, printing one line each, and counts the outcomes."""

    def __init__(self):
        self.passed = 0
        self.failed = 0

    def run(self, name, fn):
        start = time.monotonic()
        try:
            detail = fn()
        except grpc.RpcError as e:
            # The status and the daemon's message: never a token (docs/grpc.md#the-service).
            self.failed += 1
            print(f"FAIL {name}: {e.code().name}: {e.details()}", flush=True)
            return
        except Exception as e:  # a failed expectation; the messages below carry no token
            self.failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            return
        self.passed += 1
        took = time.monotonic() - start
        print(f"ok   {name}: {detail} ({took:.2f} s)", flush=True)


def expect(cond: bool, what: str):
    if not cond:
        raise AssertionError(what)


def expect_code(call, code, what: str) -> grpc.RpcError:
    """Runs `call`, which must fail with `code`; returns the error."""
    try:
        call()
    except grpc.RpcError as e:
        expect(e.code() == code, f"{what}: expected {code.name}, got {e.code().name}: {e.details()}")
        return e
    raise AssertionError(f"{what}: expected {code.name}, the call succeeded")


def check_token(t, client: str, what: str):
    """The fields every served token must have."""
    now = time.time()
    expect(t.client == client, f"{what}: client is {t.client!r}, not {client!r}")
    expect(len(t.access_token) > 0, f"{what}: empty access_token")
    expect(t.token_type != "", f"{what}: empty token_type")
    expect(t.HasField("expires_at"), f"{what}: no expires_at")
    expect(seconds(t.expires_at) > now, f"{what}: expires_at is not in the future")
    expect(t.HasField("issued_at"), f"{what}: no issued_at")
    expect(seconds(t.issued_at) <= seconds(t.expires_at), f"{what}: issued after it expires")
    expect(t.generation >= 1, f"{what}: generation {t.generation} < 1")


def describe(t) -> str:
    left = seconds(t.expires_at) - time.time()
    return (
        f"client={t.client} type={t.token_type} generation={t.generation} "
        f"expires in {left:.1f} s token {fingerprint(t.access_token)}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("socket", help="the daemon's Unix socket (daemon.socket)")
    ap.add_argument("client", help="a client with short-lived tokens")
    ap.add_argument("--failing", metavar="NAME", help="a client whose provider is unreachable")
    args = ap.parse_args()

    checks = Checks()
    with tempfile.TemporaryDirectory(prefix="tokenwarden-stubs-") as gen:
        pb, pb_grpc = generate_stubs(gen)
        print(f"ok   stubs: generated from {PROTO_FILE} with grpcio-tools", flush=True)

        # The target every user's program writes: no channel options at all.
        target = "unix:" + args.socket
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.TokenServiceStub(channel)
            run_checks(checks, pb, stub, channel, args)

    print(f"client_test: {checks.passed} passed, {checks.failed} failed", flush=True)
    return 1 if checks.failed else 0


def run_checks(checks, pb, stub, channel, args):
    client = args.client
    first = {}

    def get_token():
        t = stub.GetToken(pb.GetTokenRequest(client=client), timeout=10)
        check_token(t, client, "GetToken")
        first["token"] = t
        return describe(t)

    checks.run("GetToken", get_token)

    def watch_token():
        stream = stub.WatchToken(pb.WatchTokenRequest(client=client), timeout=15)
        seen = []
        try:
            for t in stream:
                check_token(t, client, f"WatchToken message {len(seen) + 1}")
                seen.append(t)
                if len(seen) == 2:
                    break
        finally:
            stream.cancel()
        expect(len(seen) == 2, f"WatchToken ended after {len(seen)} token(s)")
        a, b = seen
        expect(b.generation > a.generation, f"generation {a.generation} then {b.generation}")
        expect(b.access_token != a.access_token, "the second token is the first one again")
        return (
            f"generation {a.generation} -> {b.generation}, "
            f"tokens {fingerprint(a.access_token)} -> {fingerprint(b.access_token)}"
        )

    checks.run("WatchToken", watch_token)

    def refresh_token():
        # Within `min_interval` of the last token the daemon answers with that token
        # (coalescing); after it, RefreshToken fetches a new one. Ask until the generation rises.
        deadline = time.monotonic() + 8
        coalesced = 0
        while True:
            before = stub.GetToken(pb.GetTokenRequest(client=client), timeout=5)
            t = stub.RefreshToken(pb.RefreshTokenRequest(client=client), timeout=10)
            check_token(t, client, "RefreshToken")
            expect(t.generation >= before.generation, "RefreshToken went back a generation")
            if t.generation > before.generation:
                expect(t.access_token != before.access_token, "a new generation, the same token")
                return (
                    f"generation {before.generation} -> {t.generation}, token "
                    f"{fingerprint(t.access_token)} ({coalesced} coalesced answers first)"
                )
            coalesced += 1
            expect(time.monotonic() < deadline, "the generation did not rise within 8 s")
            time.sleep(0.25)

    checks.run("RefreshToken", refresh_token)

    def list_clients():
        r = stub.ListClients(pb.ListClientsRequest(), timeout=5)
        names = [c.client for c in r.clients]
        expect(client in names, f"{client} not among {names}")
        expect(names == sorted(names), f"not in name order: {names}")
        mine = next(c for c in r.clients if c.client == client)
        state = pb.State.Name(mine.state)
        expect(state == "VALID", f"{client} is {state}")
        expect(mine.HasField("expires_at"), f"{client} has no expires_at")
        expect(mine.HasField("last_refresh_at"), f"{client} has no last_refresh_at")
        return f"{len(names)} clients, {client} {state}"

    checks.run("ListClients", list_clients)

    def health():
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        h = health_pb2_grpc.HealthStub(channel)
        out = []
        for service in ["", SERVICE]:
            r = h.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
            expect(status == "SERVING", f"service {service!r} is {status}")
            out.append(f"{service or '(server)'} {status}")
        return ", ".join(out)

    checks.run("Health", health)

    def reflection():
        from google.protobuf import descriptor_pool
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
            ProtoReflectionDescriptorDatabase,
        )

        # grpcio-reflection's client speaks grpc.reflection.v1alpha.
        db = ProtoReflectionDescriptorDatabase(channel)
        services = list(db.get_services())
        expect(SERVICE in services, f"{SERVICE} not among {services}")
        # The file descriptors too: enough to build the service from reflection alone.
        svc = descriptor_pool.DescriptorPool(db).FindServiceByName(SERVICE)
        methods = sorted(m.name for m in svc.methods)
        want = ["GetToken", "ListClients", "RefreshToken", "WatchToken"]
        expect(methods == want, f"methods {methods}")
        return f"v1alpha lists {', '.join(sorted(services))}; {SERVICE} has {', '.join(methods)}"

    checks.run("Reflection", reflection)

    def not_found():
        e = expect_code(
            lambda: stub.GetToken(pb.GetTokenRequest(client="no-such-client"), timeout=5),
            grpc.StatusCode.NOT_FOUND,
            "GetToken of an unknown client",
        )
        expect("no-such-client" in e.details(), f"message {e.details()!r} names no client")
        expect_code(
            lambda: next(stub.WatchToken(pb.WatchTokenRequest(client="no-such-client"), timeout=5)),
            grpc.StatusCode.NOT_FOUND,
            "WatchToken of an unknown client",
        )
        return f"GetToken and WatchToken: {e.details()}"

    checks.run("NotFound", not_found)

    def invalid_argument():
        e = expect_code(
            lambda: stub.GetToken(pb.GetTokenRequest(client=""), timeout=5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "GetToken with an empty name",
        )
        return e.details()

    checks.run("InvalidArgument", invalid_argument)

    if args.failing:

        def unavailable():
            start = time.monotonic()
            e = expect_code(
                lambda: stub.GetToken(pb.GetTokenRequest(client=args.failing), timeout=5),
                grpc.StatusCode.UNAVAILABLE,
                f"GetToken of {args.failing}",
            )
            took = time.monotonic() - start
            expect(took < 2, f"UNAVAILABLE took {took:.1f} s, not at once")
            expect(args.failing in e.details(), f"message {e.details()!r} names no client")
            return e.details()

        checks.run("Unavailable", unavailable)

    def deadline():
        # A watch with a short deadline: the current token, then DEADLINE_EXCEEDED.
        stream = stub.WatchToken(pb.WatchTokenRequest(client=client), timeout=0.5)
        start = time.monotonic()
        got = 0
        try:
            for t in stream:
                check_token(t, client, "watch with a deadline")
                got += 1
        except grpc.RpcError as e:
            expect(
                e.code() == grpc.StatusCode.DEADLINE_EXCEEDED,
                f"expected DEADLINE_EXCEEDED, got {e.code().name}: {e.details()}",
            )
        else:
            raise AssertionError("the watch ended without an error")
        took = time.monotonic() - start
        expect(got >= 1, "no token before the deadline")
        expect(took < 3, f"the deadline took {took:.1f} s")
        return f"WatchToken with a 0.5 s deadline: {got} token(s), then DEADLINE_EXCEEDED"

    checks.run("Deadline", deadline)

    def no_daemon():
        # The daemon not running: a socket path nobody listens on.
        with tempfile.TemporaryDirectory() as d:
            with grpc.insecure_channel("unix:" + os.path.join(d, "absent.sock")) as ch:
                s = type(stub)(ch)
                e = expect_code(
                    lambda: s.GetToken(pb.GetTokenRequest(client=client), timeout=3),
                    grpc.StatusCode.UNAVAILABLE,
                    "GetToken with no daemon",
                )
        return f"no socket: {e.code().name}"

    checks.run("NoDaemon", no_daemon)


if __name__ == "__main__":
    sys.exit(main())
