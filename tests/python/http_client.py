"""tokenwarden's HTTP API from Python, standard library only (docs/http.md).

Usage: python3 http_client.py NAME [SOCKET]
Prints the client's token generation, then waits for the next token and prints its generation.
"""
import http.client
import json
import socket
import sys
import urllib.parse


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket: the Host header says localhost."""

    def __init__(self, path, timeout=75):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def get_token(name, socket_path="/run/tokenwarden/http.sock", **params):
    """The token of client NAME as a dict (access_token, expires_at, generation, ...).
    params: min_valid="5m", after_generation=N (waits up to 60 s for a newer token)."""
    conn = UnixHTTPConnection(socket_path)
    try:
        query = urllib.parse.urlencode(params)
        conn.request("GET", f"/v1/token/{urllib.parse.quote(name)}" + (f"?{query}" if query else ""))
        resp = conn.getresponse()
        body = json.loads(resp.read())
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"{resp.status} {body['error']}: {body['message']}")
    return body


if __name__ == "__main__":
    name = sys.argv[1]
    path = sys.argv[2] if len(sys.argv) > 2 else "/run/tokenwarden/http.sock"
    token = get_token(name, path)
    print("generation", token["generation"], "expires", token["expires_at"])
    # Use token["access_token"] as "Authorization: Bearer ..."; then wait for the next one.
    newer = get_token(name, path, after_generation=token["generation"])
    print("generation", newer["generation"], "expires", newer["expires_at"])
