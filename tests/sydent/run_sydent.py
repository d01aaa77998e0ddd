#!/usr/bin/env python3
"""Start a real Sydent 2.6.1 node for the sydent-rs interop tests.

Run it with the venv python made by tests/sydent/setup.sh:

    target/sydent-venv/bin/python tests/sydent/run_sydent.py \
        --dir DIR --server-name sydent.test \
        --client-port 18090 --internal-port 18091 --replication-port 18434 \
        --certfile DIR/sydent-combined.pem --cacert DIR/ca.pem \
        --peer 'rust.test=https://localhost:28434=<ed25519 verify key, unpadded base64>' \
        [--peer ...] [--signing-key 'ed25519 0 <seed, unpadded base64>']

What it does, in order:
  1. writes DIR/sydent.conf (every listener bound to --bind-address, 127.0.0.1 by default;
     DB, pid file and log inside DIR);
  2. creates DIR/sydent.db with Sydent's own schema code (sydent.db.sqlitedb) and makes the
     peers / peer_pubkeys tables hold exactly the --peer list (active = 1; any other peer row
     is set active = 0; lastSentVersion of an already-known peer is kept);
  3. runs Sydent in this process exactly as `python -m sydent.sydent` does (parse the config
     named by SYDENT_CONF, set up logging, construct Sydent, run the reactor), so the pid of
     this process is Sydent's pid: SIGTERM/SIGINT stop it.

Readiness: once the reactor is running (all listeners are bound) one line is printed to stdout
and flushed:

    SYDENT READY name=<server name> client=http://127.0.0.1:<p> internal=http://127.0.0.1:<p>
        replication=https://127.0.0.1:<p> verify_key=<unpadded base64 ed25519 public key>

(on a single line). The ports are the ones actually bound, so any of --client-port,
--internal-port and --replication-port may be 0 (the kernel picks a free port) and be read back
from this line. --internal-port omitted = no internal API; --certfile omitted = no replication
listener and no pushes. Anything else on stdout (Sydent prints a "WARNING:" line about the
missing templates directory) can be
ignored. Sydent's own log goes to DIR/sydent.log unless --log-file says otherwise ('-' =
stderr). If a port is taken, the process exits non-zero before printing the READY line.

Other modes:
  --prepare-only          do steps 1 and 2, print the SYDENT_CONF path and exit; then start
                          with `cd DIR && SYDENT_CONF=DIR/sydent.conf python -m sydent.sydent`.
  --gen-signing-key       print a new signing key ('ed25519 0 <seed>') and, on a second line,
                          its verify key (unpadded base64), then exit.
"""

import argparse
import configparser
import os
import sqlite3
import sys
import types
from urllib.parse import urlsplit


def _signing_key_tools():
    import signedjson.key

    return signedjson.key


def parse_signing_key(text):
    """'ed25519 0 <seed b64>' -> signedjson signing key object."""
    parts = text.split()
    if len(parts) != 3 or parts[0] != "ed25519":
        raise SystemExit("--signing-key must look like 'ed25519 0 <unpadded base64 seed>'")
    return _signing_key_tools().decode_signing_key_base64(parts[0], parts[1], parts[2])


def verify_key_b64(signing_key):
    from unpaddedbase64 import encode_base64

    return encode_base64(signing_key.verify_key.encode())


def new_signing_key_text():
    sk = _signing_key_tools().generate_signing_key("0")
    return "ed25519 0 " + _signing_key_tools().encode_signing_key_base64(sk)


def parse_peer(spec):
    """NAME=URL=PUBKEY (PUBKEY: standard unpadded base64; a trailing '=' padding is dropped)."""
    try:
        name, rest = spec.split("=", 1)
        url, key = rest.split("=", 1)
    except ValueError:
        raise SystemExit(f"--peer {spec!r}: expected NAME=URL=PUBKEY_BASE64")
    key = key.rstrip("=")
    if not name or not key:
        raise SystemExit(f"--peer {spec!r}: NAME and PUBKEY must not be empty")
    # Sydent decodes every peer key on every push tick; one undecodable key makes the tick raise,
    # which stops the push loop for all peers until restart. Refuse such keys here.
    from unpaddedbase64 import decode_base64

    try:
        raw = decode_base64(key)
    except Exception:
        raw = b""
    if len(raw) != 32:
        raise SystemExit(f"--peer {spec!r}: PUBKEY must be a 32-byte ed25519 key in base64")
    try:
        int(key, 16)
        raise SystemExit(f"--peer {spec!r}: Sydent would read this all-hex key as hex")
    except ValueError:
        pass
    port = None
    if url:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise SystemExit(f"--peer {spec!r}: URL must be https://HOST[:PORT][/prefix]")
        port = parts.port or 443
    return name, url, port, key


def esc(value):
    # Sydent reads the file with ConfigParser's BasicInterpolation: a literal % is %%.
    return str(value).replace("%", "%%")


def write_config(args, conf_path, db_path, signing_key_text, peers):
    cfg = configparser.ConfigParser(interpolation=None)
    cfg["general"] = {
        "server.name": args.server_name,
        "log.path": "" if args.log_file == "-" else args.log_file,
        "log.level": args.log_level,
        "pidfile.path": os.path.join(args.dir, "sydent.pid"),
        # No email templates are needed for replication tests; a missing directory only
        # makes Sydent print a warning.
        "templates.path": os.path.join(args.dir, "res"),
    }
    if args.prometheus_port:
        cfg["general"]["prometheus_port"] = str(args.prometheus_port)
        cfg["general"]["prometheus_addr"] = args.bind_address
    cfg["db"] = {"db.file": db_path}
    cfg["http"] = {
        "clientapi.http.bind_address": args.bind_address,
        "clientapi.http.port": str(args.client_port),
        "internalapi.http.bind_address": args.bind_address,
        "internalapi.http.port": "" if args.internal_port is None else str(args.internal_port),
        "replication.https.certfile": args.certfile or "",
        "replication.https.cacert": args.cacert or "",
        "replication.https.bind_address": args.bind_address,
        "replication.https.port": str(args.replication_port),
    }
    cfg["crypto"] = {"ed25519.signingkey": signing_key_text}
    for name, url, _port, _key in peers:
        if url:
            cfg[f"peer.{name}"] = {"base_replication_url": url}
    for item in args.set or []:
        try:
            lhs, value = item.split("=", 1)
            section, key = lhs.split(":", 1)
        except ValueError:
            raise SystemExit(f"--set {item!r}: expected SECTION:KEY=VALUE")
        if not cfg.has_section(section):
            cfg.add_section(section)
        cfg[section][key] = value
    for section in cfg.sections():
        for key in cfg[section]:
            cfg[section][key] = esc(cfg[section][key])
    tmp = conf_path + ".tmp"
    with open(tmp, "w") as fp:
        fp.write("# Written by tests/sydent/run_sydent.py; rewritten on every start.\n")
        cfg.write(fp)
    os.replace(tmp, conf_path)


def existing_signing_key(conf_path):
    if not os.path.exists(conf_path):
        return None
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(conf_path)
    return cfg.get("crypto", "ed25519.signingkey", fallback=None) or None


def prepare_db(db_path, peers):
    # Let Sydent's own code create / migrate the schema (sydent.db.sqlitedb.SqliteDatabase
    # only needs `.config.database.database_path` from its argument).
    from sydent.db.sqlitedb import SqliteDatabase

    stub = types.SimpleNamespace(
        config=types.SimpleNamespace(database=types.SimpleNamespace(database_path=db_path))
    )
    SqliteDatabase(stub).db.close()

    db = sqlite3.connect(db_path)
    with db:
        names = [p[0] for p in peers]
        for name, _url, port, key in peers:
            # Sydent reads: peers.name, port (used only without base_replication_url),
            # lastSentVersion (NULL = send everything), active (must be 1), and
            # peer_pubkeys(peername, alg='ed25519', key=<unpadded base64>).
            db.execute(
                "INSERT INTO peers (name, port, lastSentVersion, active) VALUES (?, ?, NULL, 1) "
                "ON CONFLICT(name) DO UPDATE SET port = excluded.port, active = 1",
                (name, port),
            )
            db.execute(
                "INSERT INTO peer_pubkeys (peername, alg, key) VALUES (?, 'ed25519', ?) "
                "ON CONFLICT(peername, alg) DO UPDATE SET key = excluded.key",
                (name, key),
            )
        placeholders = ",".join("?" * len(names))
        db.execute(
            f"UPDATE peers SET active = 0 WHERE name NOT IN ({placeholders})"
            if names
            else "UPDATE peers SET active = 0",
            names,
        )
    db.close()


def run_sydent(conf_path, args, verify_key):
    # The same steps as sydent.sydent.main(), plus a readiness line once the reactor runs.
    from twisted.internet import reactor

    from sydent.config import SydentConfig
    from sydent.sydent import Sydent, setup_logging

    os.environ["SYDENT_CONF"] = conf_path
    config = SydentConfig()
    config.parse_config_file(conf_path)
    setup_logging(config)
    syd = Sydent(config)

    # Record the ports Sydent actually binds (so a port of 0 works): Sydent calls listenTCP for
    # the client API and then for the internal API, and listenSSL for replication.
    bound = {"tcp": [], "ssl": []}

    def recording(kind, listen):
        def wrapper(*a, **kw):
            port = listen(*a, **kw)
            bound[kind].append(port.getHost().port)
            return port

        return wrapper

    reactor.listenTCP = recording("tcp", reactor.listenTCP)
    reactor.listenSSL = recording("ssl", reactor.listenSSL)

    host = args.bind_address
    if ":" in host:
        host = f"[{host}]"

    def ready():
        # listenSSL is built on listenTCP, so the replication port shows up in both lists.
        bound["tcp"] = [p for p in bound["tcp"] if p not in bound["ssl"]]
        fields = [f"name={args.server_name}", f"client=http://{host}:{bound['tcp'][0]}"]
        if len(bound["tcp"]) > 1:
            fields.append(f"internal=http://{host}:{bound['tcp'][1]}")
        if bound["ssl"]:
            fields.append(f"replication=https://{host}:{bound['ssl'][0]}")
        fields.append(f"verify_key={verify_key}")
        print("SYDENT READY " + " ".join(fields), flush=True)

    reactor.callWhenRunning(ready)
    syd.run()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gen-signing-key", action="store_true")
    ap.add_argument("--dir")
    ap.add_argument("--server-name")
    ap.add_argument("--bind-address", default="127.0.0.1")
    ap.add_argument("--client-port", type=int)
    ap.add_argument("--internal-port", type=int)
    ap.add_argument("--replication-port", type=int, default=0)
    ap.add_argument("--certfile", help="one PEM file holding the private key and the certificate")
    ap.add_argument("--cacert", help="PEM CA certificate: trust root for both directions")
    ap.add_argument("--peer", action="append", default=[], metavar="NAME=URL=PUBKEY")
    ap.add_argument("--signing-key", help="'ed25519 0 <seed>'; default: reuse DIR/sydent.conf's or make one")
    ap.add_argument("--log-file", help="default DIR/sydent.log; '-' = stderr")
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--prometheus-port", type=int)
    ap.add_argument("--set", action="append", metavar="SECTION:KEY=VALUE", help="extra config value")
    ap.add_argument("--prepare-only", action="store_true")
    args = ap.parse_args()

    if args.gen_signing_key:
        text = new_signing_key_text()
        print(text)
        print(verify_key_b64(parse_signing_key(text)))
        return

    for required in ("dir", "server_name", "client_port"):
        if getattr(args, required) is None:
            ap.error(f"--{required.replace('_', '-')} is required")

    args.dir = os.path.abspath(args.dir)
    os.makedirs(args.dir, exist_ok=True)
    for attr in ("certfile", "cacert"):
        path = getattr(args, attr)
        if path:
            path = os.path.abspath(path)
            if not os.path.isfile(path):
                raise SystemExit(f"--{attr}: {path} does not exist")
            setattr(args, attr, path)
    if args.log_file is None:
        args.log_file = os.path.join(args.dir, "sydent.log")
    elif args.log_file != "-":
        args.log_file = os.path.abspath(args.log_file)

    conf_path = os.path.join(args.dir, "sydent.conf")
    db_path = os.path.join(args.dir, "sydent.db")
    peers = [parse_peer(p) for p in args.peer]

    signing_key_text = args.signing_key or existing_signing_key(conf_path) or new_signing_key_text()
    verify_key = verify_key_b64(parse_signing_key(signing_key_text))

    write_config(args, conf_path, db_path, signing_key_text, peers)
    prepare_db(db_path, peers)

    os.chdir(args.dir)
    if args.prepare_only:
        print(conf_path, flush=True)
        return
    run_sydent(conf_path, args, verify_key)


if __name__ == "__main__":
    main()
