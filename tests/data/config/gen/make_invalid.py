#!/usr/bin/env python3
"""Writes tests/data/config/invalid/*.toml from the specs below.

Each body marks where an error is expected with «N»; the script removes the markers and
writes one `# error: LINE:COL: text` line per marker (in position order) at the top of the
file, so the locations are computed rather than counted by hand. Run it after editing a spec.
"""
import os, re

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "invalid")

# The shapes the specs are built from. A spec spells out the lines that carry its markers.
URL = 'token_url = "https://auth.example/token"\n'
ID_AND_SECRET = 'client_id = "c"\nclient_secret = { file = "../secrets/transatel" }\n'
# A client that is fine by itself (client_credentials, client_secret_basic).
OK_CLIENT = URL + ID_AND_SECRET
# private_key_jwt without its private_key line.
KEY_JWT = URL + 'client_auth = "private_key_jwt"\nclient_id = "c"\n'
# A complete client_secret_jwt client.
SECRET_JWT = (URL + 'client_auth = "client_secret_jwt"\nclient_id = "c"\n'
              'client_secret = { file = "../secrets/talentsoft" }\n')
ES256 = 'private_key = { file = "../keys/es256.pem" }\n'


def table(name):
    return f"[clients.{name}]\n"


def ok(name):
    """A [clients.NAME] table holding OK_CLIENT."""
    return table(name) + OK_CLIENT


SPECS = {}

def spec(name, body, *texts, extra_header=()):
    SPECS[name] = (body, texts, extra_header)

spec("unknown-key", '''«0»[clients.x]
«1»tokn_url = "https://auth.example/token"
''' + ID_AND_SECRET + '''«2»scopes = "a"
''', 'missing key "token_url" in [clients.x]',
     'unknown key "tokn_url" in [clients.x]; did you mean "token_url"?',
     'unknown key "scopes" in [clients.x]; did you mean "scope"?')

spec("grant-typo", ok("x") + '''grant_type = «0»"client_credential"
''', 'unknown grant_type "client_credential"; did you mean "client_credentials"?')

spec("client-auth-typo", ok("x") + '''client_auth = «0»"client_secret_bsaic"
''', 'did you mean "client_secret_basic"?')

spec("http-not-loopback", '''[clients.x]
token_url = «0»"http://auth.example/token"
''' + ID_AND_SECRET + '''
[clients.y]
token_url = «1»"http://127.0.0.1.example/token"
''' + ID_AND_SECRET, 'uses plain http', 'uses plain http')

spec("bad-url", '''[clients.x]
token_url = «0»"not a url"
''' + ID_AND_SECRET + '''
[clients.y]
token_url = «1»"ftp://auth.example/token"
''' + ID_AND_SECRET, 'invalid token_url "not a url"', 'scheme "ftp" is not https')

spec("duplicate-output", ok("a") + '''[[clients.a.outputs]]
path = "/run/tw/a.token"
[[clients.a.outputs]]
path = «0»"/run/tw/a.token"

''' + ok("b") + '''[[clients.b.outputs]]
path = «1»"/run/tw//a.token"
''', 'output path "/run/tw/a.token" is already used by client "a" at ',
     'is already used by client "a"')

spec("relative-output", ok("a") + '''[[clients.a.outputs]]
path = «0»"run/a.token"
''', 'output path "run/a.token" must be absolute')

spec("output-format-prefix", ok("a") + '''[[clients.a.outputs]]
path = "/run/tw/a.env"
format = «0»"jsno"
env_prefix = «1»"1TD-"
«2»formats = "x"
''', 'unknown output format "jsno"; did you mean "json"?', 'invalid env_prefix "1TD-"',
     'unknown key "formats" in [[clients.a.outputs]]; did you mean "format"?')

spec("bad-modes", '''[daemon]
socket_mode = «0»"99999"

''' + ok("a") + '''[[clients.a.outputs]]
path = "/run/tw/a"
mode = «1»"0648"
[[clients.a.outputs]]
path = "/run/tw/b"
mode = «2»640
[[clients.a.outputs]]
path = "/run/tw/c"
mode = «3»"17777"
''', 'invalid mode "99999"', 'invalid mode "0648"', 'not the number 640', 'larger than 07777')

spec("bad-durations", '''[defaults]
timeout = «0»"5x"
retry_max = «1»10

''' + ok("a") + '''min_interval = «2»"ten seconds"
''', 'timeout: invalid duration "5x"', 'write "10s" rather than 10', 'min_interval: invalid duration')

spec("timing", ok("a") + '''refresh_at = «0»1.5
retry_initial = «1»"10m"
timeout = «2»"0s"

''' + ok("b") + '''refresh_at = 0.5
jitter = «3»0.5
default_lifetime = «4»"0s"
''', 'refresh_at = 1.5 must be more than 0 and at most 1',
     'retry_initial (10m) is longer than retry_max (5m)', 'timeout must be more than zero',
     'jitter = 0.5 must be at least 0 and less than refresh_at (0.5)',
     'default_lifetime must be more than zero')

spec("defaults-timing", '''[defaults]
jitter = «0»0.8
«1»refresh_att = 0.5
«2»''' + URL + '''
''' + ok("a") + '''
''' + ok("b"), 'jitter = 0.8 must be at least 0 and less than refresh_at (0.75)',
     'unknown key "refresh_att" in [defaults]; did you mean "refresh_at"?',
     'unknown key "token_url" in [defaults]')

spec("missing-client-secret", '''«0»[clients.a]
''' + URL + '''client_id = "c"

«1»[clients.b]
''' + URL + '''client_auth = "client_secret_post"
client_secret = { file = "../secrets/transatel" }
''', '[clients.a] needs "client_secret" (client_auth = "client_secret_basic")',
     '[clients.b] needs "client_id"')

spec("password-missing", '''«0»«1»''' + ok("a") + '''grant_type = "password"
''', '[clients.a] needs "username" (grant_type = "password")',
     '[clients.a] needs "password" (grant_type = "password")')

spec("refresh-token-missing", '''«0»''' + ok("a") + '''grant_type = "refresh_token"
''', '[clients.a] needs "refresh_token" (grant_type = "refresh_token")')

spec("irrelevant-keys", ok("a") + '''«0»password = { file = "../secrets/creads-password" }
«1»private_key = { file = "../keys/es256.pem" }
«2»key_id = "k"
«3»signing_alg = "ES256"
«4»username = "u"
''', '"password" is not used with grant_type = "client_credentials"',
     '"private_key" is not used with client_auth = "client_secret_basic"',
     '"key_id" is not used with client_auth = "client_secret_basic"',
     '"signing_alg" is not used with client_auth = "client_secret_basic"',
     '"username" is not used with grant_type = "client_credentials"')

spec("none-with-secret", table("a") + URL + '''client_id = "c"
client_auth = "none"
«0»client_secret = { file = "../secrets/transatel" }
''', '"client_secret" is not used with client_auth = "none"')

spec("secret-sources", table("a") + URL + '''client_id = "c"
client_secret = «0»{ file = "../secrets/does-not-exist" }

''' + table("b") + URL + '''client_id = "c"
client_secret = «1»{ env = "TOKENWARDEN_TEST_SURELY_UNSET_VARIABLE" }

''' + table("c") + URL + '''client_id = "c"
client_secret = «2»{ file = "../secrets/empty" }
''', 'client_secret: cannot read secret file', 'environment variable TOKENWARDEN_TEST_SURELY_UNSET_VARIABLE is not set',
     'client_secret: secret from file')

spec("credential-unset", table("a") + URL + '''grant_type = "password"
''' + ID_AND_SECRET + '''username = "u"
password = «0»{ credential = "creads-password" }
''', 'password: systemd credential creads-password asked for, but $CREDENTIALS_DIRECTORY is not set')

spec("secret-syntax", table("a") + URL + '''grant_type = "password"
client_id = "c"
client_secret = «0»{ fiel = "../secrets/transatel" }
username = "u"
password = «1»{ file = "a", env = "b" }
''', 'client_secret: unknown key "fiel" in a secret; did you mean "file"?',
     'password: a secret takes exactly one of file, env or credential')

spec("sec1-key", table("a") + KEY_JWT + '''private_key = «0»{ file = "../keys/sec1.pem" }
''', 'private_key: the EC key is in SEC1 form')

spec("alg-mismatch", table("a") + KEY_JWT + '''private_key = «0»{ file = "../keys/es256.pem" }
signing_alg = "ES384"

''' + table("b") + KEY_JWT + '''private_key = «1»{ file = "../keys/es256.pem" }
signing_alg = "RS256"

''' + table("c") + KEY_JWT + '''private_key = «2»{ file = "../keys/es256.pub.pem" }

''' + table("d") + KEY_JWT + ES256 + '''signing_alg = «3»"ES265"
''', 'private_key: the key does not fit ES384', 'private_key: the key does not fit RS256',
     'private_key: this is a public key or certificate', 'unknown signing algorithm "ES265"')

spec("alg-family", table("a") + KEY_JWT + ES256 + '''signing_alg = «0»"HS256"

''' + table("b") + SECRET_JWT + '''signing_alg = «1»"RS256"
''', 'signing_alg HS256 is an HMAC algorithm, but private_key_jwt signs with a private key',
     'client_secret_jwt signs with the client secret: signing_alg must be HS256, HS384 or HS512, not RS256')

spec("assertion", '''«0»[clients.a]
''' + URL + '''grant_type = "jwt_bearer"

''' + table("b") + URL + '''grant_type = "jwt_bearer"
[clients.b.assertion]
key = { file = "../secrets/talentsoft" }
lifetime = «1»"2h"
«2»kid = "x"
claims = { sub = "s", roles = «3»["a"] }
''', '[clients.a] needs a [clients.NAME.assertion] table (grant_type = "jwt_bearer")',
     'an assertion lifetime of 2h is over the maximum of 1h',
     'unknown key "kid" in [clients.b.assertion]',
     'claims: invalid type: sequence, expected a string, number or boolean')

spec("assertion-key", table("a") + URL + '''grant_type = "jwt_bearer"
[clients.a.assertion]
signing_alg = "ES256"
key = «0»{ file = "../secrets/talentsoft" }

[clients.«1»b.assertion]
signing_alg = "HS256"
key = { file = "../secrets/talentsoft" }
''', 'assertion.key: the key is not PEM', 'missing key "token_url" in [clients.b]')

spec("assertion-wrong-grant", ok("a") + '''
«0»[clients.a.assertion]
key = { file = "../secrets/talentsoft" }
''', '"assertion" is not used with grant_type = "client_credentials"')

spec("client-names", '''[clients.«0»"a b"]
''' + OK_CLIENT + '''
[clients.«1»xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx]
''' + OK_CLIENT + '''
[clients.«2»"é"]
''' + OK_CLIENT, 'invalid client name "a b"', 'invalid client name "xxx', 'invalid client name "é"')

spec("unknown-tables", '''[«0»deamon]
socket = "/run/tw.sock"

[«1»client.a]
''' + URL, 'unknown table "deamon"; did you mean "daemon"?', 'unknown table "client"; did you mean "clients"?')

spec("daemon", '''[daemon]
socket = «0»"tw.sock"
state_dir = «1»"state"
metrics_listen = «2»"localhost:9464"
log_format = «3»"xml"
log_level = «4»"info,[["
max_concurrent_refreshes = «5»0
«6»includes = ["x"]
''', 'socket "tw.sock" must be an absolute path', 'state_dir "state" must be an absolute path',
     'metrics_listen "localhost:9464" is not a socket address', 'unknown log_format "xml"',
     'invalid log_level "info,[["', 'max_concurrent_refreshes must be at least 1',
     'unknown key "includes" in [daemon]; did you mean "include"?')

spec("cron", ok("a") + '''rotate_cron = «0»"0 3 * * *"

''' + ok("b") + '''rotate_cron = «1»"0 0 25 * * *"
''', 'rotate_cron "0 3 * * *" has 5 fields; it needs 6', 'invalid rotate_cron "0 0 25 * * *"')

spec("users-groups", ok("a") + '''allow_users = ["root", «0»"tokenwarden-no-such-user"]
allow_groups = [«1»"tokenwarden-no-such-group"]
[[clients.a.outputs]]
path = "/run/tw/a"
owner = «3»"tokenwarden-no-such-user"
group = «4»"tokenwarden-no-such-group"
[[clients.a.outputs]]
path = "/run/tw/b"
owner = «2»-1
''', 'unknown user "tokenwarden-no-such-user"', 'unknown group "tokenwarden-no-such-group"',
     'owner: -1 is not a valid uid or gid', 'unknown user', 'unknown group')

spec("headers-params", ok("a") + '''extra_headers = { «0»Authorization = "Bearer x", «1»"bad name" = "v", «2»"X-Ok" = "bad\\u0001value" }
extra_params = { «3»grant_type = "password", «4»scope = "x", tenant = "ok" }
''', 'extra_headers may not set "Authorization"', 'invalid HTTP header name "bad name"',
     'invalid value for HTTP header "X-Ok"', 'extra_params may not set "grant_type"',
     'extra_params may not set "scope": tokenwarden sets it itself; use the scope key')

spec("syntax", '''[clients.a]
token_url = "https://auth.example/token«1»
client_id = «0»= "c"
''', 'TOML syntax: extra `=`', 'TOML syntax: invalid basic string')

spec("wrong-types", table("a") + URL + '''client_id = «0»3
client_secret = { file = "../secrets/transatel" }
scope = «1»5
allow_users = «2»"root"
outputs = «3»"x"

''' + table("b") + URL + '''client_id = "c"
client_secret = «4»["x"]
''', 'client_id: invalid type: integer', 'scope: invalid type: integer',
     'allow_users: invalid type: string', 'outputs of client "a" must be [[clients.a.outputs]] tables',
     'client_secret: invalid type: sequence, expected a secret')

spec("scope-token", ok("a") + '''scope = «0»["a b"]
''', 'scope: scope value "a b" contains a space')

spec("lifetimes", table("a") + KEY_JWT + ES256 + '''assertion_lifetime = «0»"61m"

''' + table("b") + SECRET_JWT + '''assertion_lifetime = «1»"0s"
''', 'assertion lifetime of 1h 1m is over the maximum of 1h', 'an assertion lifetime must be more than zero')

spec("inline-secret-redacted", table("a") + KEY_JWT + '''private_key = «0»"hunter2-not-a-key"
«1»client_secret = "hunter2-client-secret"
«2»password = "hunter2-password-value"

''' + table("b") + URL + '''grant_type = "password"
client_id = "c"
client_secret = "hunter2-client-secret"
username = «3»["hunter2-password-value"]
password = «4»3
''', 'private_key: the key is not PEM', '"client_secret" is not used with client_auth = "private_key_jwt"',
     '"password" is not used with grant_type = "client_credentials"', 'username: invalid type: sequence',
     'password: invalid type: integer')

spec("outputs-table", ok("a") + '''
«0»[clients.a.outputs]
path = "/run/tw/a"
''', 'must be [[clients.a.outputs]] tables')

spec("output-missing-path", ok("a") + '''
«0»[[clients.a.outputs]]
format = "json"
on_change = ["", "x"]
[[clients.a.outputs]]
path = "/run/tw/a"
on_change = «1»["", "x"]
''', 'missing key "path" in [[clients.a.outputs]]', 'on_change: the program name is empty')

spec("include-bad", '''[daemon]
include = ["../include/bad.d/*.toml", «0»"../include/[.toml"]

''' + ok("dup") + '''[[clients.dup.outputs]]
path = "/run/tw/dup"
''', 'include: invalid glob "../include/[.toml"',
     extra_header=(
         '# error: ../include/bad.d/10-bad.toml:2:2: included files may only contain [clients.*] tables, not "daemon"',
         '# error: ../include/bad.d/10-bad.toml:5:1: client "dup" is defined twice; first at ',
         '# error: ../include/bad.d/10-bad.toml:9:11: missing key "token_url" in [clients.other]',
         '# error: ../include/bad.d/10-bad.toml:10:8: output path "/run/tw/dup" is already used by client "dup"',
         '# error: ../include/bad.d/20-syntax.toml:2:13: TOML syntax',
     ))


spec("ca-file", ok("a") + '''ca_file = «0»"../secrets/transatel"

''' + ok("b") + '''ca_file = «1»"../secrets/empty"

''' + ok("c") + '''ca_file = «2»"../keys/es256.pem"

''' + ok("d") + '''ca_file = «3»"../keys/not-der.pem"

''' + ok("e") + '''ca_file = «4»"../keys/no-such-ca.pem"

''' + ok("f") + '''ca_file = "../keys/ca.pem"
''', 'secrets/transatel holds no PEM certificate (-----BEGIN CERTIFICATE-----)',
     'secrets/empty holds no PEM certificate', 'keys/es256.pem holds a private key, not a certificate',
     'keys/not-der.pem holds a certificate that cannot be used', 'cannot read ca_file ')


# Secrets of every TOML type: the error names the type, never the value.
spec("secret-types", table("a") + URL + '''client_id = "c"
client_secret = «0»314159265
''' + table("b") + URL + '''client_id = "c"
client_secret = «1»2.718281828
''' + table("c") + URL + '''client_id = "c"
client_secret = «2»true
''' + table("d") + URL + '''client_id = "c"
client_secret = «3»["hunter2-in-an-array"]
''' + table("e") + URL + '''client_id = "c"
client_secret = { file = «4»271828182 }
''' + table("f") + URL + '''client_id = "c"
client_secret = «5»1979-05-27T07:32:00Z
''' + table("g") + URL + '''grant_type = "password"
''' + ID_AND_SECRET + '''username = "u"
password = «6»161803398
''' + table("h") + URL + '''grant_type = "refresh_token"
''' + ID_AND_SECRET + '''refresh_token = «7»{ value = "hunter2-in-a-table" }
''' + table("i") + KEY_JWT + '''private_key = «8»141421356
''' + table("j") + URL + '''grant_type = "jwt_bearer"
client_id = "c"
«11»[clients.j.assertion]
key = «9»-173205080
''' + table("k") + OK_CLIENT + '''extra_headers = { Authorization = «10»223606797 }
''', 'client_secret: invalid type: integer, expected a secret', 'client_secret: invalid type: floating point, expected a secret',
     'client_secret: invalid type: boolean, expected a secret', 'client_secret: invalid type: sequence, expected a secret',
     'client_secret: invalid type: integer, expected a string', 'client_secret: invalid type: date-time, expected a secret',
     'password: invalid type: integer, expected a secret', 'refresh_token: unknown key "value" in a secret',
     'private_key: invalid type: integer, expected a secret', 'key: invalid type: integer, expected a secret',
     'extra_headers: invalid type: integer, expected a string', 'missing key "key" in [clients.j.assertion]')

def render(name, body, texts, extra_header):
    marks = []
    clean = ""
    i = 0
    for m in re.finditer(r"«(\d+)»", body):
        clean += body[i:m.start()]
        marks.append((int(m.group(1)), len(clean)))
        i = m.end()
    clean += body[i:]
    assert sorted(n for n, _ in marks) == list(range(len(texts))), name
    header_lines = len(texts) + len(extra_header)
    out = []
    for n, off in sorted(marks, key=lambda m: m[1]):
        before = clean[:off]
        line = before.count("\n") + 1 + header_lines
        col = len(before) - (before.rfind("\n") + 1) + 1
        out.append(f"# error: {line}:{col}: {texts[n]}")
    return "\n".join(out + list(extra_header)) + "\n" + clean


for name, (body, texts, extra) in SPECS.items():
    with open(os.path.join(OUT, name + ".toml"), "w") as f:
        f.write(render(name, body, texts, extra))
print(len(SPECS), "fixtures")
