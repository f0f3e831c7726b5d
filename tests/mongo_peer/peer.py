#!/usr/bin/env python3
"""A stateful MongoDB wire-protocol peer for tests: a one-node replica-set primary on loopback.

It is NOT a MongoDB server. It speaks enough of the wire protocol (OP_MSG, plus legacy OP_QUERY
for the first handshake) for the official drivers (pymongo 4.x, the Rust `mongodb` crate 3.x) to
connect, write documents, read them back with filters/sort/limit, and follow a change stream with
resume tokens minted here. Everything lives in memory and is lost when the process exits.

Invariants the tests rely on:
- Every write (insert, update, replace, delete) appends one entry to the oplog; each entry has a
  global sequence number `seq` (1, 2, ...) and a cluster time `Timestamp(t, i)` that grows with it.
- A resume token is `{_data: <upper-case hex>}` that encodes `seq`; tokens sort (as strings) in
  event order. A change-stream event's `_id` is the token of its oplog entry; a batch's
  `postBatchResumeToken` is the token of the newest oplog position the cursor has scanned (an
  event's token, or a "high-water mark" token when the cursor scanned past entries it filtered
  out or found nothing).
- The oplog keeps at most `--oplog-size` entries. Resuming from (or a cursor positioned at) a
  point older than the oldest kept entry fails with 286 `ChangeStreamHistoryLost`; a token this
  peer did not mint fails with 260 `InvalidResumeToken`.

Control: an HTTP/1.1 JSON port (see README.md next to this file) and the wire command
`configureFailPoint: "failCommand"` (the same shape MongoDB's test servers accept).

Start: `python peer.py --port 0 --control-port 0`; the first line on stdout is a JSON object
with `port`, `control_port` and `uri`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import datetime
import hashlib
import hmac
import os
import json
import re
import signal
import ssl
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import bson
from bson import json_util
from bson.codec_options import CodecOptions
from bson.int64 import Int64
from bson.objectid import ObjectId
from bson.son import SON
from bson.timestamp import Timestamp

OP_REPLY = 1
OP_QUERY = 2004
OP_COMPRESSED = 2012
OP_MSG = 2013

MSG_CHECKSUM_PRESENT = 1
MSG_MORE_TO_COME = 2

# Keep field order (a command's name is its first key) and decode dates as aware datetimes.
CODEC = CodecOptions(document_class=SON, tz_aware=True, tzinfo=datetime.timezone.utc)

CODE_NAMES = {
    2: "BadValue",
    6: "HostUnreachable",
    7: "HostNotFound",
    9: "FailedToParse",
    11000: "DuplicateKey",
    18: "AuthenticationFailed",
    26: "NamespaceNotFound",
    43: "CursorNotFound",
    59: "CommandNotFound",
    89: "NetworkTimeout",
    91: "ShutdownInProgress",
    133: "FailedToSatisfyReadPreference",
    189: "PrimarySteppedDown",
    234: "RetryChangeStream",
    260: "InvalidResumeToken",
    262: "ExceededTimeLimit",
    280: "ChangeStreamFatalError",
    286: "ChangeStreamHistoryLost",
    9001: "SocketException",
    10107: "NotWritablePrimary",
    11600: "InterruptedAtShutdown",
    11602: "InterruptedDueToReplStateChange",
    13435: "NotPrimaryNoSecondaryOk",
    13436: "NotPrimaryOrSecondary",
}

# Errors after which a driver resumes a change stream (change-streams spec, "Resumable Error").
RESUMABLE_CODES = {6, 7, 43, 63, 89, 91, 133, 150, 189, 234, 262, 9001, 10107, 11600, 11602,
                   13388, 13435, 13436}
# "Not primary" / "node is shutting down" errors: the server's topologyVersion changes with them.
STATE_CHANGE_CODES = {91, 189, 10107, 11600, 11602, 13435, 13436}
# Errors a retryable write may be retried after (retryable-writes spec).
RETRYABLE_WRITE_CODES = {6, 7, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436}
WRITE_COMMANDS = {"insert", "update", "delete", "findandmodify", "findAndModify"}

TOKEN_VERSION = "82"
TOKEN_RE = re.compile(r"^82([0-9A-F]{16})([0-9A-F]{2})([0-9A-F]{8})([0-9A-F]{8})$")
KIND_EVENT = 0x01
KIND_HWM = 0x02  # sorts after the event token with the same seq, before the next event's


class CommandError(Exception):
    """A command failure answered as `{ok: 0, code, codeName, errmsg, errorLabels?}`."""

    def __init__(self, code: int, errmsg: str, labels: list[str] | None = None):
        super().__init__(errmsg)
        self.code = code
        self.errmsg = errmsg
        self.labels = list(labels or [])


class CloseConnection(Exception):
    """Raised to drop the client's connection without answering (a network error for it)."""


# ---------------------------------------------------------------------------------------------
# BSON value ordering and query matching
# ---------------------------------------------------------------------------------------------

def _type_rank(value: Any) -> int:
    """MongoDB's comparison order of BSON types (the brackets `sort` and `$gt` use)."""
    if value is None:
        return 1
    if isinstance(value, bool):
        return 8
    if isinstance(value, (int, float, Int64, bson.decimal128.Decimal128)):
        return 2
    if isinstance(value, str):
        return 3
    if isinstance(value, dict):
        return 4
    if isinstance(value, list):
        return 5
    if isinstance(value, (bytes, bson.binary.Binary)):
        return 6
    if isinstance(value, ObjectId):
        return 7
    if isinstance(value, datetime.datetime):
        return 9
    if isinstance(value, Timestamp):
        return 10
    return 11


def _num(value: Any) -> float:
    if isinstance(value, bson.decimal128.Decimal128):
        return float(value.to_decimal())
    return float(value)


def compare(a: Any, b: Any) -> int:
    """Total order over BSON values (type bracket first, then value), -1/0/1."""
    ra, rb = _type_rank(a), _type_rank(b)
    if ra != rb:
        return -1 if ra < rb else 1
    if ra == 1:
        return 0
    if ra == 2:
        x, y = _num(a), _num(b)
    elif ra == 4:
        for (ka, va), (kb, vb) in zip(a.items(), b.items()):
            c = compare(ka, kb) or compare(va, vb)
            if c:
                return c
        x, y = len(a), len(b)
    elif ra == 5:
        for va, vb in zip(a, b):
            c = compare(va, vb)
            if c:
                return c
        x, y = len(a), len(b)
    elif ra == 6:
        x, y = (len(a), bytes(a)), (len(b), bytes(b))
    elif ra == 7:
        x, y = a.binary, b.binary
    elif ra == 10:
        x, y = (a.time, a.inc), (b.time, b.inc)
    elif ra == 9:
        x, y = a, b
        if x.tzinfo is None:
            x = x.replace(tzinfo=datetime.timezone.utc)
        if y.tzinfo is None:
            y = y.replace(tzinfo=datetime.timezone.utc)
    else:
        x, y = str(a), str(b)
    return (x > y) - (x < y)


_MISSING = object()


def get_path(doc: Any, path: str) -> Any:
    """The value at a dotted path, or `_MISSING`."""
    cur = doc
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return _MISSING
    return cur


def _candidates(value: Any) -> list[Any]:
    """A field matches a condition when the value or (for arrays) one of its elements does."""
    if isinstance(value, list):
        return [value, *value]
    return [value]


def _match_operator(op: str, arg: Any, value: Any) -> bool:
    if op == "$exists":
        return (value is not _MISSING) == bool(arg)
    if op == "$ne":
        return not _match_operator("$eq", arg, value)
    if op == "$nin":
        return not _match_operator("$in", arg, value)
    if op == "$not":
        return not _match_condition(arg, value)
    if value is _MISSING:
        if op == "$eq":
            return arg is None
        if op == "$in":
            return any(a is None for a in arg)
        return False
    if op == "$eq":
        return any(compare(v, arg) == 0 for v in _candidates(value))
    if op == "$in":
        if not isinstance(arg, list):
            raise CommandError(2, "$in needs an array")
        return any(compare(v, a) == 0 for v in _candidates(value) for a in arg)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        for v in _candidates(value):
            if _type_rank(v) != _type_rank(arg):
                continue
            c = compare(v, arg)
            if (op == "$gt" and c > 0) or (op == "$gte" and c >= 0) or \
               (op == "$lt" and c < 0) or (op == "$lte" and c <= 0):
                return True
        return False
    if op == "$type":
        names = {"string": 3, "object": 4, "array": 5, "objectId": 7, "bool": 8, "date": 9,
                 "null": 1, "timestamp": 10}
        wanted = arg if isinstance(arg, list) else [arg]
        return any(_type_rank(value) == names.get(w, -1) for w in wanted)
    raise CommandError(2, f"unknown operator: {op}")


def _match_condition(cond: Any, value: Any) -> bool:
    if isinstance(cond, dict) and cond and all(str(k).startswith("$") for k in cond):
        return all(_match_operator(op, arg, value) for op, arg in cond.items())
    return _match_operator("$eq", cond, value)


def matches(doc: dict, query: dict | None) -> bool:
    """MongoDB query semantics for the subset tests need: dotted paths, equality, `$eq $ne $gt
    $gte $lt $lte $in $nin $exists $not $type`, and `$and $or $nor`."""
    if not query:
        return True
    for key, cond in query.items():
        if key == "$and":
            if not all(matches(doc, q) for q in cond):
                return False
        elif key == "$or":
            if not any(matches(doc, q) for q in cond):
                return False
        elif key == "$nor":
            if any(matches(doc, q) for q in cond):
                return False
        elif key.startswith("$"):
            raise CommandError(2, f"unknown top level operator: {key}")
        elif not _match_condition(cond, get_path(doc, key)):
            return False
    return True


def sort_docs(docs: list[dict], spec: dict | None) -> list[dict]:
    if not spec:
        return list(docs)
    import functools

    def cmp(a: dict, b: dict) -> int:
        for key, direction in spec.items():
            va, vb = get_path(a, key), get_path(b, key)
            va = None if va is _MISSING else va
            vb = None if vb is _MISSING else vb
            c = compare(va, vb)
            if c:
                return c if _num(direction) >= 0 else -c
        return 0

    return sorted(docs, key=functools.cmp_to_key(cmp))


def project(doc: dict, spec: dict | None) -> dict:
    """Top-level inclusion or exclusion projections (`{a: 1}` or `{a: 0}`; `_id` as MongoDB)."""
    if not spec:
        return doc
    include = [k for k, v in spec.items() if k != "_id" and v not in (0, False)]
    if include:
        out = SON()
        if spec.get("_id", 1) not in (0, False) and "_id" in doc:
            out["_id"] = doc["_id"]
        for k in include:
            v = get_path(doc, k)
            if v is not _MISSING:
                out[k] = v
        return out
    return SON((k, v) for k, v in doc.items() if spec.get(k, 1) not in (0, False))


# ---------------------------------------------------------------------------------------------
# Resume tokens
# ---------------------------------------------------------------------------------------------

def mint_token(seq: int, ts: Timestamp, kind: int) -> SON:
    """`_data` = version `82`, the oplog seq (16 hex digits, so tokens sort in event order),
    the kind (01 event, 02 high-water mark after it) and the entry's cluster time."""
    return SON([("_data", f"{TOKEN_VERSION}{seq:016X}{kind:02X}{ts.time:08X}{ts.inc:08X}")])


def parse_token(token: Any, key: str) -> tuple[int, int]:
    """`(seq, kind)` of a token this peer minted, else 260 InvalidResumeToken."""
    data = token.get("_data") if isinstance(token, dict) else None
    if isinstance(data, str):
        m = TOKEN_RE.match(data)
        if m:
            return int(m.group(1), 16), int(m.group(2), 16)
    raise CommandError(260, f"{key}: cannot parse resume token {json_util.dumps(token)}")


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------

@dataclass
class OplogEntry:
    seq: int
    ts: Timestamp
    wall: datetime.datetime
    op: str  # insert | update | replace | delete
    db: str
    coll: str
    key: Any
    doc: dict | None  # the document after the write (insert/replace/update), None for delete
    update_description: dict | None = None


@dataclass
class Cursor:
    id: int
    ns: str
    docs: collections.deque = field(default_factory=collections.deque)
    remaining: int | None = None  # limit left, None = unlimited
    change_stream: "ChangeStream | None" = None


@dataclass
class ChangeStream:
    db: str
    coll: str | None  # None: every collection of `db` (or of the cluster when db is None)
    all_dbs: bool
    position: int  # the newest oplog seq scanned
    position_kind: int
    match: list[dict]
    full_document: str
    batch_size: int


@dataclass
class FailPoint:
    commands: set
    times: int | None  # None: always on
    code: int | None
    errmsg: str | None
    labels: list | None
    close_connection: bool
    block_ms: int


class Peer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.set_name = args.set_name
        self.process_id = ObjectId()
        self.topology_counter = 0
        self.topology_changed = asyncio.Event()
        self.collections: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
        self.oplog: collections.deque[OplogEntry] = collections.deque()
        self.last_seq = 0
        self.trimmed_through = 0  # newest seq no longer in the oplog
        self.trimmed_ts = Timestamp(0, 0)  # its cluster time
        self.ts_time = int(time.time())
        self.ts_inc = 0
        self.oplog_grew = asyncio.Condition()
        self.cursors: dict[int, Cursor] = {}
        self.next_cursor = 1000
        self.fail_points: list[FailPoint] = []
        self.received: list[dict] = []
        self.connections: dict[int, asyncio.StreamWriter] = {}
        self.next_connection = 1
        self.host = ""
        self.election_id = ObjectId()
        # SCRAM users of the admin database: name -> password (--user NAME:PASSWORD).
        self.users: dict[str, str] = dict(u.split(":", 1) for u in args.user)
        self.authenticated: dict[int, str] = {}  # connection -> user
        self.sasl: dict[int, dict] = {}  # connection -> SCRAM conversation in progress
        self.waiting_get_mores = 0  # change-stream getMores waiting for events right now

    # -- clock and oplog --------------------------------------------------------------------

    def now_ts(self) -> Timestamp:
        return Timestamp(max(self.ts_time, 1), self.ts_inc)

    def tick(self) -> Timestamp:
        now = int(time.time())
        if now > self.ts_time:
            self.ts_time, self.ts_inc = now, 1
        else:
            self.ts_inc += 1
        return Timestamp(self.ts_time, self.ts_inc)

    async def append(self, op: str, db: str, coll: str, key: Any, doc: dict | None,
                     update_description: dict | None = None) -> None:
        self.last_seq += 1
        self.oplog.append(OplogEntry(self.last_seq, self.tick(),
                                     datetime.datetime.now(datetime.timezone.utc), op, db, coll,
                                     key, doc, update_description))
        self.trim(self.args.oplog_size)
        async with self.oplog_grew:
            self.oplog_grew.notify_all()

    def trim(self, keep: int) -> None:
        while len(self.oplog) > max(keep, 0):
            entry = self.oplog.popleft()
            self.trimmed_through, self.trimmed_ts = entry.seq, entry.ts

    def bump_topology(self) -> None:
        self.topology_counter += 1
        self.topology_changed.set()
        self.topology_changed = asyncio.Event()

    def topology_version(self) -> SON:
        return SON([("processId", self.process_id), ("counter", Int64(self.topology_counter))])

    def new_cursor_id(self) -> int:
        self.next_cursor += 1
        return self.next_cursor

    # -- fail points --------------------------------------------------------------------------

    def take_fail_point(self, command: str) -> FailPoint | None:
        for fp in self.fail_points:
            if command in fp.commands:
                if fp.times is not None:
                    fp.times -= 1
                    if fp.times <= 0:
                        self.fail_points.remove(fp)
                return fp
        return None

    def add_fail_point(self, spec: dict) -> FailPoint:
        """`spec`: `{commands: [..], times?: n, code?, errmsg?, labels?, closeConnection?,
        blockTimeMS?}`; `times` absent means one time; `times: null` (JSON) is not allowed,
        `"alwaysOn": true` is."""
        commands = spec.get("commands") or spec.get("failCommands")
        if not isinstance(commands, list) or not commands:
            raise ValueError("commands: a non-empty list of command names is required")
        times = None if spec.get("alwaysOn") else int(spec.get("times", 1))
        code = spec.get("code", spec.get("errorCode"))
        close = bool(spec.get("closeConnection", False))
        if code is None and not close:
            raise ValueError("give code (an error code) or closeConnection: true")
        fp = FailPoint(set(commands), times, None if code is None else int(code),
                       spec.get("errmsg"), spec.get("labels", spec.get("errorLabels")),
                       close, int(spec.get("blockTimeMS", 0)))
        self.fail_points.append(fp)
        return fp

    def labels_for(self, command: str, code: int, cursor: Cursor | None) -> list[str]:
        labels = []
        if command == "getMore" and cursor is not None and cursor.change_stream is not None \
                and code in RESUMABLE_CODES:
            labels.append("ResumableChangeStreamError")
        if command in WRITE_COMMANDS and code in RETRYABLE_WRITE_CODES:
            labels.append("RetryableWriteError")
        return labels

    # -- connection handling ------------------------------------------------------------------

    async def serve_client(self, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        conn_id = self.next_connection
        self.next_connection += 1
        self.connections[conn_id] = writer
        peer_cert = None
        ssl_obj = writer.get_extra_info("ssl_object")
        if ssl_obj is not None:
            peer_cert = ssl_obj.getpeercert()
        try:
            while True:
                header = await reader.readexactly(16)
                length, request_id, _response_to, opcode = struct.unpack("<iiii", header)
                if length < 16 or length > 48_000_000:
                    break
                payload = await reader.readexactly(length - 16)
                if opcode == OP_MSG:
                    flags = struct.unpack_from("<I", payload, 0)[0]
                    body = self.parse_op_msg(payload, flags)
                    reply = await self.run_command(body, conn_id, peer_cert, writer)
                    if flags & MSG_MORE_TO_COME:
                        continue
                    data = b"".join([struct.pack("<I", 0), b"\x00",
                                     bson.encode(reply, codec_options=CODEC)])
                    writer.write(struct.pack("<iiii", 16 + len(data), self.new_request_id(),
                                             request_id, OP_MSG) + data)
                elif opcode == OP_QUERY:
                    body = self.parse_op_query(payload)
                    reply = await self.run_command(body, conn_id, peer_cert, writer, "OP_QUERY")
                    doc = bson.encode(reply, codec_options=CODEC)
                    data = struct.pack("<iqii", 0, 0, 0, 1) + doc
                    writer.write(struct.pack("<iiii", 16 + len(data), self.new_request_id(),
                                             request_id, OP_REPLY) + data)
                else:
                    break  # OP_COMPRESSED is never negotiated; anything else is not spoken here
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, CloseConnection, ssl.SSLError,
                asyncio.CancelledError):
            pass
        except (struct.error, bson.errors.BSONError, ValueError, IndexError) as e:
            # A malformed message: log it and drop the connection (a server would too).
            print(f"mongo-peer: connection {conn_id}: malformed message: {e!r}", file=sys.stderr)
        finally:
            self.connections.pop(conn_id, None)
            self.authenticated.pop(conn_id, None)
            self.sasl.pop(conn_id, None)
            writer.transport.abort()

    _request_id = 0

    def new_request_id(self) -> int:
        Peer._request_id = (Peer._request_id + 1) % 2**31
        return Peer._request_id

    @staticmethod
    def parse_op_msg(payload: bytes, flags: int) -> SON:
        end = len(payload) - (4 if flags & MSG_CHECKSUM_PRESENT else 0)
        pos = 4
        body: SON | None = None
        sequences: list[tuple[str, list]] = []
        while pos < end:
            kind = payload[pos]
            pos += 1
            if kind == 0:
                size = struct.unpack_from("<i", payload, pos)[0]
                body = bson.decode(payload[pos:pos + size], codec_options=CODEC)
                pos += size
            elif kind == 1:
                size = struct.unpack_from("<i", payload, pos)[0]
                section_end = pos + size
                name_end = payload.index(b"\x00", pos + 4)
                name = payload[pos + 4:name_end].decode()
                docs = []
                p = name_end + 1
                while p < section_end:
                    dsize = struct.unpack_from("<i", payload, p)[0]
                    docs.append(bson.decode(payload[p:p + dsize], codec_options=CODEC))
                    p += dsize
                sequences.append((name, docs))
                pos = section_end
            else:
                raise CloseConnection()
        if body is None:
            raise CloseConnection()
        for name, docs in sequences:
            body[name] = docs
        return body

    @staticmethod
    def parse_op_query(payload: bytes) -> SON:
        name_end = payload.index(b"\x00", 4)
        collection = payload[4:name_end].decode()
        pos = name_end + 1 + 8
        size = struct.unpack_from("<i", payload, pos)[0]
        query = bson.decode(payload[pos:pos + size], codec_options=CODEC)
        if "$query" in query:
            query = query["$query"]
        query["$db"] = collection.split(".", 1)[0]
        return query

    async def run_command(self, body: SON, conn_id: int, peer_cert: Any,
                          writer: asyncio.StreamWriter, op: str = "OP_MSG") -> SON:
        if not body:
            return self.error(59, "empty command")
        name = next(iter(body))
        db = body.get("$db", "admin")
        self.received.append({"command": name, "db": db, "connection": conn_id, "op": op,
                              "body": json.loads(json_util.dumps(body))})
        cursor = None
        if name == "getMore":
            cursor = self.cursors.get(int(body["getMore"]))
        fp = None if name in ("configureFailPoint",) else self.take_fail_point(name)
        try:
            if fp is not None:
                if fp.block_ms:
                    await asyncio.sleep(fp.block_ms / 1000)
                if fp.close_connection:
                    raise CloseConnection()
                code = int(fp.code)  # add_fail_point guarantees a code without closeConnection
                if code in STATE_CHANGE_CODES:
                    self.bump_topology()
                labels = fp.labels if fp.labels is not None else \
                    self.labels_for(name, code, cursor)
                reply = self.error(code, fp.errmsg or f"injected {CODE_NAMES.get(code, code)}",
                                   labels)
                if code in STATE_CHANGE_CODES:
                    reply["topologyVersion"] = self.topology_version()
                return reply
            handler = COMMANDS.get(name) or COMMANDS.get(name.lower())
            if handler is None:
                raise CommandError(59, f"no such command: '{name}'")
            if self.args.require_auth and conn_id not in self.authenticated \
                    and name not in NO_AUTH_COMMANDS:
                raise CommandError(13, f"command {name} requires authentication")
            reply = await handler(self, body, db, conn_id, peer_cert)
        except CommandError as e:
            reply = self.error(e.code, e.errmsg, e.labels)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            reply = self.error(2, f"{name}: bad command: {type(e).__name__}: {e}")
        except (CloseConnection, asyncio.CancelledError):
            raise
        except Exception as e:  # a peer bug must show up as a failed command, not a hang
            print(f"mongo-peer: {name} failed: {e!r}", file=sys.stderr)
            reply = self.error(1, f"mongo-peer internal error in {name}: {e!r}")
        reply.setdefault("ok", 1.0)
        reply["$clusterTime"] = SON([("clusterTime", self.now_ts()),
                                     ("signature", SON([("hash", bson.Binary(bytes(20))),
                                                        ("keyId", Int64(0))]))])
        reply["operationTime"] = self.now_ts()
        return reply

    @staticmethod
    def error(code: int, errmsg: str, labels: list | None = None) -> SON:
        reply = SON([("ok", 0.0), ("errmsg", errmsg), ("code", code),
                     ("codeName", CODE_NAMES.get(code, "UnknownError"))])
        if labels:
            reply["errorLabels"] = list(labels)
        return reply


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

COMMANDS: dict[str, Any] = {}


def command(*names: str):
    def register(fn):
        for n in names:
            COMMANDS[n] = fn
        return fn
    return register


def x509_subject(peer_cert: Any) -> str | None:
    if not peer_cert:
        return None
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
             "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L"}
    parts = [f"{short.get(k, k)}={v}" for rdn in peer_cert.get("subject", ()) for k, v in rdn]
    return ",".join(reversed(parts))


def x509_login(peer: Peer, request: dict, peer_cert: Any, conn_id: int) -> SON:
    if request.get("mechanism") != "MONGODB-X509":
        raise CommandError(18, f"mechanism {request.get('mechanism')!r} is not supported by "
                               "this peer (MONGODB-X509 only)")
    subject = x509_subject(peer_cert)
    if subject is None:
        raise CommandError(18, "MONGODB-X509: no client certificate was presented")
    user = request.get("user")
    if user is not None and user != subject:
        raise CommandError(18, f"MONGODB-X509: user {user!r} is not the certificate subject "
                               f"{subject!r}")
    peer.received.append({"command": "authenticated", "user": subject,
                          "mechanism": "MONGODB-X509"})
    peer.authenticated[conn_id] = subject
    return SON([("dbname", "$external"), ("user", subject)])


# Commands a client may send before it authenticates (with --require-auth).
NO_AUTH_COMMANDS = {"hello", "isMaster", "ismaster", "saslStart", "saslContinue",
                    "authenticate", "ping", "buildInfo", "buildinfo", "endSessions"}

SCRAM_HASHES = {"SCRAM-SHA-256": hashlib.sha256, "SCRAM-SHA-1": hashlib.sha1}
SCRAM_ITERATIONS = {"SCRAM-SHA-256": 15000, "SCRAM-SHA-1": 10000}


def _scram_attrs(message: str) -> dict:
    return dict(part.split("=", 1) for part in message.split(",") if "=" in part)


def sasl_start(peer: Peer, request: dict, conn_id: int) -> SON:
    """SCRAM (RFC 5802, RFC 7677) server side, first step: answers the client-first message with
    the server-first message. MongoDB's SCRAM-SHA-1 password is md5("user:mongo:password")."""
    mechanism = request.get("mechanism")
    if mechanism not in SCRAM_HASHES:
        raise CommandError(2, f"mechanism {mechanism!r} is not supported by this peer "
                              "(SCRAM-SHA-256, SCRAM-SHA-1, MONGODB-X509)")
    client_first = bytes(request["payload"]).decode()
    if not client_first.startswith("n,,"):
        raise CommandError(18, "SCRAM: channel binding is not supported")
    bare = client_first[3:]
    attrs = _scram_attrs(bare)
    user, client_nonce = attrs.get("n", "").replace("=2C", ",").replace("=3D", "="), attrs["r"]
    if user not in peer.users:
        raise CommandError(18, f"Authentication failed: no user {user!r}")
    password = peer.users[user]
    if mechanism == "SCRAM-SHA-1":
        password = hashlib.md5(f"{user}:mongo:{password}".encode()).hexdigest()
    salt = os.urandom(16)
    iterations = SCRAM_ITERATIONS[mechanism]
    nonce = client_nonce + base64.b64encode(os.urandom(24)).decode()
    server_first = f"r={nonce},s={base64.b64encode(salt).decode()},i={iterations}"
    peer.sasl[conn_id] = {"mechanism": mechanism, "user": user, "bare": bare,
                          "server_first": server_first, "nonce": nonce,
                          "salted": hashlib.pbkdf2_hmac(SCRAM_HASHES[mechanism]().name,
                                                        password.encode(), salt, iterations),
                          "skip_empty": bool((request.get("options") or {})
                                             .get("skipEmptyExchange"))}
    return SON([("conversationId", 1), ("done", False), ("payload", server_first.encode())])


def sasl_continue(peer: Peer, request: dict, conn_id: int) -> SON:
    state = peer.sasl.get(conn_id)
    if state is None:
        raise CommandError(17, "No SASL session state found")
    if state.get("verified"):
        peer.sasl.pop(conn_id, None)
        return SON([("conversationId", 1), ("done", True), ("payload", b"")])
    final = bytes(request["payload"]).decode()
    attrs = _scram_attrs(final)
    without_proof = final.rsplit(",p=", 1)[0]
    h = SCRAM_HASHES[state["mechanism"]]
    auth_message = f"{state['bare']},{state['server_first']},{without_proof}".encode()
    client_key_expected = hmac.new(state["salted"], b"Client Key", h).digest()
    stored_key = h(client_key_expected).digest()
    signature = hmac.new(stored_key, auth_message, h).digest()
    try:
        proof = base64.b64decode(attrs.get("p", ""))
    except ValueError:
        proof = b""
    client_key = bytes(a ^ b for a, b in zip(proof, signature))
    if attrs.get("r") != state["nonce"] or len(proof) != len(signature) or \
            not hmac.compare_digest(h(client_key).digest(), stored_key):
        peer.sasl.pop(conn_id, None)
        raise CommandError(18, f"Authentication failed for user {state['user']!r}")
    server_key = hmac.new(state["salted"], b"Server Key", h).digest()
    server_final = "v=" + base64.b64encode(hmac.new(server_key, auth_message, h).digest()).decode()
    peer.authenticated[conn_id] = state["user"]
    peer.received.append({"command": "authenticated", "user": state["user"],
                          "mechanism": state["mechanism"]})
    if state["skip_empty"]:
        peer.sasl.pop(conn_id, None)
        return SON([("conversationId", 1), ("done", True), ("payload", server_final.encode())])
    state["verified"] = True
    return SON([("conversationId", 1), ("done", False), ("payload", server_final.encode())])


@command("saslStart")
async def cmd_sasl_start(peer: Peer, body: SON, db: str, conn_id: int, peer_cert: Any) -> SON:
    return sasl_start(peer, body, conn_id)


@command("saslContinue")
async def cmd_sasl_continue(peer: Peer, body: SON, db: str, conn_id: int,
                            peer_cert: Any) -> SON:
    return sasl_continue(peer, body, conn_id)


@command("hello", "isMaster", "ismaster")
async def cmd_hello(peer: Peer, body: SON, db: str, conn_id: int, peer_cert: Any) -> SON:
    tv = body.get("topologyVersion")
    if tv is not None and "maxAwaitTimeMS" in body and tv.get("processId") == peer.process_id \
            and int(tv.get("counter", -1)) == peer.topology_counter:
        try:
            await asyncio.wait_for(peer.topology_changed.wait(),
                                   int(body["maxAwaitTimeMS"]) / 1000)
        except asyncio.TimeoutError:
            pass
    primary_key = "isWritablePrimary" if next(iter(body)) == "hello" else "ismaster"
    reply = SON([
        ("helloOk", True),
        (primary_key, True),
        ("topologyVersion", peer.topology_version()),
        ("maxBsonObjectSize", 16 * 1024 * 1024),
        ("maxMessageSizeBytes", 48_000_000),
        ("maxWriteBatchSize", 100_000),
        ("localTime", datetime.datetime.now(datetime.timezone.utc)),
        ("logicalSessionTimeoutMinutes", 30),
        ("connectionId", conn_id),
        ("minWireVersion", 0),
        ("maxWireVersion", 21),
        ("readOnly", False),
        ("setName", peer.set_name),
        ("setVersion", 1),
        ("hosts", [peer.host]),
        ("primary", peer.host),
        ("me", peer.host),
        ("electionId", peer.election_id),
        ("lastWrite", SON([("opTime", SON([("ts", peer.now_ts()), ("t", Int64(1))])),
                           ("lastWriteDate", datetime.datetime.now(datetime.timezone.utc))])),
    ])
    mechs = body.get("saslSupportedMechs")
    if isinstance(mechs, str) and mechs.split(".", 1)[-1] in peer.users:
        reply["saslSupportedMechs"] = ["SCRAM-SHA-256", "SCRAM-SHA-1"]
    spec = body.get("speculativeAuthenticate")
    if spec is not None:
        if "saslStart" in spec:
            reply["speculativeAuthenticate"] = sasl_start(peer, spec, conn_id)
        else:
            reply["speculativeAuthenticate"] = x509_login(peer, spec, peer_cert, conn_id)
    return reply


@command("authenticate")
async def cmd_authenticate(peer: Peer, body: SON, db: str, conn_id: int, peer_cert: Any) -> SON:
    return x509_login(peer, body, peer_cert, conn_id)


@command("create")
async def cmd_create(peer: Peer, body: SON, db: str, conn_id: int, peer_cert: Any) -> SON:
    """Creates an empty collection (listCollections then names it, as a server does)."""
    peer.collections[(db, body["create"])]  # defaultdict: exists from now on
    return SON()


@command("ping", "endSessions", "createIndexes", "killAllSessions")
async def cmd_ok(peer: Peer, body: SON, db: str, conn_id: int, peer_cert: Any) -> SON:
    return SON()


@command("buildInfo", "buildinfo")
async def cmd_build_info(peer: Peer, body: SON, db: str, conn_id: int, peer_cert: Any) -> SON:
    return SON([("version", "7.0.0"), ("versionArray", [7, 0, 0, 0]),
                ("gitVersion", "mongo-peer"), ("maxBsonObjectSize", 16 * 1024 * 1024),
                ("mongoPeer", True)])


@command("listCollections")
async def cmd_list_collections(peer: Peer, body: SON, db: str, conn_id: int,
                               peer_cert: Any) -> SON:
    docs = [SON([("name", coll), ("type", "collection"), ("options", SON()),
                 ("info", SON([("readOnly", False)])),
                 ("idIndex", SON([("v", 2), ("key", SON([("_id", 1)])), ("name", "_id_")]))])
            for (d, coll) in sorted(peer.collections) if d == db]
    docs = [d for d in docs if matches(d, body.get("filter"))]
    if body.get("nameOnly"):
        docs = [SON([("name", d["name"]), ("type", d["type"])]) for d in docs]
    return first_batch(peer, f"{db}.$cmd.listCollections", docs, body.get("cursor", {}), None)


@command("drop")
async def cmd_drop(peer: Peer, body: SON, db: str, conn_id: int, peer_cert: Any) -> SON:
    peer.collections.pop((db, body["drop"]), None)
    return SON([("ns", f"{db}.{body['drop']}")])


@command("insert")
async def cmd_insert(peer: Peer, body: SON, db: str, conn_id: int, peer_cert: Any) -> SON:
    coll = body["insert"]
    store = peer.collections[(db, coll)]
    n, write_errors = 0, []
    for index, doc in enumerate(body.get("documents", [])):
        if "_id" not in doc:
            doc = SON([("_id", ObjectId()), *doc.items()])
        if any(compare(d["_id"], doc["_id"]) == 0 for d in store):
            write_errors.append(SON([("index", index), ("code", 11000),
                                     ("errmsg", f"E11000 duplicate key error collection: "
                                                f"{db}.{coll} index: _id_ dup key: "
                                                f"{{ _id: {json_util.dumps(doc['_id'])} }}")]))
            if body.get("ordered", True):
                break
            continue
        store.append(doc)
        n += 1
        await peer.append("insert", db, coll, doc["_id"], doc)
    reply = SON([("n", n)])
    if write_errors:
        reply["writeErrors"] = write_errors
    return reply


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return SON((k, _deep_copy(v)) for k, v in value.items())
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _parent(doc: dict, path: str, create: bool) -> tuple[dict | None, str]:
    """The sub-document holding the last part of a dotted path (created when `create`)."""
    parts = path.split(".")
    cur = doc
    for part in parts[:-1]:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            if not create:
                return None, parts[-1]
            if nxt is not None:
                raise CommandError(28, f"Cannot create field '{parts[-1]}' in element "
                                       f"{{{part}: {nxt!r}}}")
            nxt = SON()
            cur[part] = nxt
        cur = nxt
    return cur, parts[-1]


def apply_update(doc: SON, update: dict, inserting: bool) -> tuple[SON, dict]:
    """`update` is an operator document (`$set $unset $inc $setOnInsert $currentDate`); returns
    the new document and its change-stream `updateDescription`."""
    new = _deep_copy(doc)
    updated, removed = SON(), []
    for op, fields in update.items():
        if op == "$setOnInsert" and not inserting:
            continue
        for path, value in fields.items():
            parent, last = _parent(new, path, op != "$unset")
            if op in ("$set", "$setOnInsert"):
                parent[last] = value
            elif op == "$unset":
                if parent is not None and last in parent:
                    del parent[last]
                    removed.append(path)
                continue
            elif op == "$inc":
                parent[last] = parent.get(last, 0) + value
            elif op == "$currentDate":
                parent[last] = datetime.datetime.now(datetime.timezone.utc)
            else:
                raise CommandError(2, f"unsupported update operator {op}")
            updated[path] = parent[last]
    if "_id" in doc and compare(new.get("_id"), doc["_id"]) != 0:
        raise CommandError(66, "Performing an update on the path '_id' would modify the "
                               "immutable field '_id'")
    return new, SON([("updatedFields", updated), ("removedFields", removed),
                     ("truncatedArrays", [])])


def equality_fields(query: dict) -> SON:
    """The fields an upsert copies from its filter (equality conditions and `$eq`)."""
    out = SON()
    for k, v in query.items():
        if k.startswith("$") or "." in k:
            continue
        if isinstance(v, dict) and v and all(str(x).startswith("$") for x in v):
            if "$eq" in v:
                out[k] = v["$eq"]
            continue
        out[k] = v
    return out


@command("update")
async def cmd_update(peer: Peer, body: SON, db: str, conn_id: int, peer_cert: Any) -> SON:
    coll = body["update"]
    store = peer.collections[(db, coll)]
    n = modified = 0
    upserted = []
    for index, stmt in enumerate(body.get("updates", [])):
        q, u = stmt.get("q", {}), stmt["u"]
        if isinstance(u, list):
            raise CommandError(2, "pipeline updates are not supported by this peer")
        operator = bool(u) and all(str(k).startswith("$") for k in u)
        hits = [i for i, d in enumerate(store) if matches(d, q)]
        if not stmt.get("multi", False):
            hits = hits[:1]
        for i in hits:
            old = store[i]
            if operator:
                new, desc = apply_update(old, u, False)
                op = "update"
            else:
                new, desc, op = SON([("_id", old["_id"]), *((k, v) for k, v in u.items()
                                                             if k != "_id")]), None, "replace"
            n += 1
            if new != old:
                modified += 1
                store[i] = new
                await peer.append(op, db, coll, old["_id"], new, desc)
        if not hits and stmt.get("upsert", False):
            base = equality_fields(q)
            if operator:
                new, _ = apply_update(base, u, True)
            else:
                new = SON([("_id", base["_id"])] if "_id" in base else [])
                new.update(u)
            if "_id" not in new:
                new = SON([("_id", ObjectId()), *new.items()])
            store.append(new)
            n += 1
            upserted.append(SON([("index", index), ("_id", new["_id"])]))
            await peer.append("insert", db, coll, new["_id"], new)
    reply = SON([("n", n), ("nModified", modified)])
    if upserted:
        reply["upserted"] = upserted
    return reply


@command("delete")
async def cmd_delete(peer: Peer, body: SON, db: str, conn_id: int, peer_cert: Any) -> SON:
    coll = body["delete"]
    store = peer.collections[(db, coll)]
    n = 0
    for stmt in body.get("deletes", []):
        hits = [d for d in store if matches(d, stmt.get("q", {}))]
        if int(stmt.get("limit", 0)) == 1:
            hits = hits[:1]
        for d in hits:
            store.remove(d)
            n += 1
            await peer.append("delete", db, coll, d["_id"], None)
    return SON([("n", n)])


@command("count")
async def cmd_count(peer: Peer, body: SON, db: str, conn_id: int, peer_cert: Any) -> SON:
    docs = [d for d in peer.collections.get((db, body["count"]), []) if
            matches(d, body.get("query"))]
    docs = docs[int(body.get("skip", 0)):]
    limit = abs(int(body.get("limit", 0)))
    return SON([("n", len(docs[:limit] if limit else docs))])


def first_batch(peer: Peer, ns: str, docs: list, cursor_opts: dict, limit: int | None) -> SON:
    """Answers a cursor-returning command: the first batch now, the rest through getMore."""
    batch_size = cursor_opts.get("batchSize", 101) if cursor_opts else 101
    cursor = Cursor(peer.new_cursor_id(), ns, collections.deque(docs), limit)
    batch = take(cursor, int(batch_size))
    cid = 0
    if cursor.docs and (cursor.remaining is None or cursor.remaining > 0):
        peer.cursors[cursor.id] = cursor
        cid = cursor.id
    return SON([("cursor", SON([("firstBatch", batch), ("id", Int64(cid)), ("ns", ns)]))])


def take(cursor: Cursor, batch_size: int) -> list:
    n = batch_size if batch_size > 0 else 101
    if cursor.remaining is not None:
        n = min(n, cursor.remaining)
    out = []
    while cursor.docs and len(out) < n:
        out.append(cursor.docs.popleft())
    if cursor.remaining is not None:
        cursor.remaining -= len(out)
    return out


@command("find")
async def cmd_find(peer: Peer, body: SON, db: str, conn_id: int, peer_cert: Any) -> SON:
    coll = body["find"]
    docs = [d for d in peer.collections.get((db, coll), []) if matches(d, body.get("filter"))]
    docs = sort_docs(docs, body.get("sort"))[int(body.get("skip", 0)):]
    docs = [project(d, body.get("projection")) for d in docs]
    limit = int(body.get("limit", 0))
    single = body.get("singleBatch", False) or limit < 0
    limit = abs(limit) or None
    if single:
        docs = docs[:limit or int(body.get("batchSize", 101))]
        limit = len(docs)
        return SON([("cursor", SON([("firstBatch", docs), ("id", Int64(0)),
                                    ("ns", f"{db}.{coll}")]))])
    opts = {"batchSize": body["batchSize"]} if "batchSize" in body else {}
    return first_batch(peer, f"{db}.{coll}", docs, opts, limit)


def run_pipeline(docs: list, pipeline: list) -> list:
    for stage in pipeline:
        (op, arg), = stage.items()
        if op == "$match":
            docs = [d for d in docs if matches(d, arg)]
        elif op == "$sort":
            docs = sort_docs(docs, arg)
        elif op == "$skip":
            docs = docs[int(arg):]
        elif op == "$limit":
            docs = docs[:int(arg)]
        elif op == "$project":
            docs = [project(d, arg) for d in docs]
        elif op == "$count":
            docs = [SON([(arg, len(docs))])] if docs else []
        elif op == "$group" and set(arg) == {"_id", "n"} and arg["n"] == {"$sum": 1}:
            docs = [SON([("_id", arg["_id"]), ("n", len(docs))])] if docs else []
        else:
            raise CommandError(2, f"aggregation stage {op} is not supported by this peer")
    return docs


@command("aggregate")
async def cmd_aggregate(peer: Peer, body: SON, db: str, conn_id: int, peer_cert: Any) -> SON:
    target = body["aggregate"]
    pipeline = body.get("pipeline", [])
    if pipeline and "$changeStream" in pipeline[0]:
        return open_change_stream(peer, body, db, target, pipeline)
    if not isinstance(target, str):
        raise CommandError(2, "aggregate: 1 is only supported with $changeStream here")
    docs = run_pipeline(list(peer.collections.get((db, target), [])), pipeline)
    return first_batch(peer, f"{db}.{target}", docs, body.get("cursor", {}), None)


# -- change streams ----------------------------------------------------------------------------

def open_change_stream(peer: Peer, body: SON, db: str, target: Any, pipeline: list) -> SON:
    spec = pipeline[0]["$changeStream"]
    for stage in pipeline[1:]:
        if next(iter(stage)) != "$match":
            raise CommandError(2, f"change stream stage {next(iter(stage))} is not supported "
                                  "by this peer ($match only)")
    all_dbs = bool(spec.get("allChangesForCluster", False))
    coll = target if isinstance(target, str) else None
    position, kind = peer.last_seq, KIND_HWM
    resume = spec.get("resumeAfter") or spec.get("startAfter")
    key = "resumeAfter" if "resumeAfter" in spec else "startAfter"
    if resume is not None:
        position, kind = parse_token(resume, key)
        if position > peer.last_seq:
            raise CommandError(260, f"{key}: resume token is newer than the oplog's head")
        check_history(peer, position, kind)
    elif "startAtOperationTime" in spec:
        at = spec["startAtOperationTime"]
        if peer.trimmed_through and compare(at, peer.trimmed_ts) <= 0:
            raise CommandError(286, "startAtOperationTime is older than the oplog")
        position = peer.trimmed_through
        for entry in peer.oplog:
            if compare(entry.ts, at) < 0:
                position = entry.seq
    full_document = spec.get("fullDocument", "default")
    if full_document not in ("default", "updateLookup", "whenAvailable", "required"):
        raise CommandError(2, f"fullDocument: unsupported value {full_document!r}")
    cursor_opts = body.get("cursor", {}) or {}
    batch_size = int(cursor_opts.get("batchSize", 101) or 101)
    cs = ChangeStream(db, coll, all_dbs, position, kind, [s["$match"] for s in pipeline[1:]],
                      full_document, batch_size)
    ns = f"{db}.{coll}" if coll else f"{db}.$cmd.aggregate"
    cursor = Cursor(peer.new_cursor_id(), ns, change_stream=cs)
    peer.cursors[cursor.id] = cursor
    batch, pbrt = scan(peer, cs, batch_size)
    return SON([("cursor", SON([("firstBatch", batch), ("postBatchResumeToken", pbrt),
                                ("id", Int64(cursor.id)), ("ns", ns)]))])


def check_history(peer: Peer, position: int, kind: int) -> None:
    """A position is lost when oplog entries after it (or, for an event token, the event's own
    entry) have been trimmed."""
    lost = position < peer.trimmed_through or (kind == KIND_EVENT and
                                               position == peer.trimmed_through and position > 0)
    if lost:
        raise CommandError(286, f"Resume of change stream was not possible, as the resume point "
                                f"may no longer be in the oplog (position {position}, oplog "
                                f"trimmed through {peer.trimmed_through})")


def event_for(peer: Peer, cs: ChangeStream, entry: OplogEntry) -> SON:
    ev = SON([("_id", mint_token(entry.seq, entry.ts, KIND_EVENT)),
              ("operationType", entry.op),
              ("clusterTime", entry.ts),
              ("wallTime", entry.wall),
              ("ns", SON([("db", entry.db), ("coll", entry.coll)])),
              ("documentKey", SON([("_id", entry.key)]))])
    if entry.op in ("insert", "replace"):
        ev["fullDocument"] = entry.doc
    elif entry.op == "update":
        if cs.full_document != "default":
            current = next((d for d in peer.collections.get((entry.db, entry.coll), [])
                            if compare(d["_id"], entry.key) == 0), None)
            ev["fullDocument"] = current
        ev["updateDescription"] = entry.update_description
    return ev


def scan(peer: Peer, cs: ChangeStream, batch_size: int) -> tuple[list, SON]:
    """Events after the stream's position, up to `batch_size`; advances the position over every
    oplog entry looked at and returns the batch with its postBatchResumeToken."""
    check_history(peer, cs.position, cs.position_kind)
    batch = []
    for entry in peer.oplog:
        if entry.seq <= cs.position:
            continue
        if len(batch) >= batch_size:
            break
        cs.position, cs.position_kind = entry.seq, KIND_HWM
        if not cs.all_dbs and entry.db != cs.db:
            continue
        if cs.coll is not None and entry.coll != cs.coll:
            continue
        ev = event_for(peer, cs, entry)
        if all(matches(ev, m) for m in cs.match):
            batch.append(ev)
            cs.position_kind = KIND_EVENT
    if not batch:
        # As a server's high-water mark: an empty batch's token is never an event's _id.
        cs.position_kind = KIND_HWM
    ts = next((e.ts for e in peer.oplog if e.seq == cs.position), peer.trimmed_ts)
    return batch, mint_token(cs.position, ts, cs.position_kind)


@command("getMore")
async def cmd_get_more(peer: Peer, body: SON, db: str, conn_id: int, peer_cert: Any) -> SON:
    cid = int(body["getMore"])
    cursor = peer.cursors.get(cid)
    if cursor is None:
        raise CommandError(43, f"cursor id {cid} not found")
    batch_size = int(body.get("batchSize", 0) or 0)
    cs = cursor.change_stream
    if cs is None:
        batch = take(cursor, batch_size)
        if not cursor.docs or (cursor.remaining is not None and cursor.remaining <= 0):
            peer.cursors.pop(cid, None)
            cid = 0
        return SON([("cursor", SON([("nextBatch", batch), ("id", Int64(cid)),
                                    ("ns", cursor.ns)]))])
    deadline = time.monotonic() + int(body.get("maxTimeMS", 1000)) / 1000
    peer.waiting_get_mores += 1
    try:
        return await _await_events(peer, cursor, cs, cid, batch_size, deadline)
    finally:
        peer.waiting_get_mores -= 1


async def _await_events(peer: Peer, cursor: Cursor, cs: ChangeStream, cid: int, batch_size: int,
                        deadline: float) -> SON:
    while True:
        try:
            batch, pbrt = scan(peer, cs, batch_size or cs.batch_size)
        except CommandError:
            peer.cursors.pop(cid, None)
            raise
        left = deadline - time.monotonic()
        if batch or left <= 0 or cid not in peer.cursors:
            break
        try:
            async with peer.oplog_grew:
                await asyncio.wait_for(peer.oplog_grew.wait(), left)
        except asyncio.TimeoutError:
            pass
    return SON([("cursor", SON([("nextBatch", batch), ("postBatchResumeToken", pbrt),
                                ("id", Int64(cid)), ("ns", cursor.ns)]))])


@command("killCursors")
async def cmd_kill_cursors(peer: Peer, body: SON, db: str, conn_id: int, peer_cert: Any) -> SON:
    killed, unknown = [], []
    for cid in body.get("cursors", []):
        (killed if peer.cursors.pop(int(cid), None) is not None else unknown).append(cid)
    return SON([("cursorsKilled", killed), ("cursorsNotFound", unknown), ("cursorsAlive", []),
                ("cursorsUnknown", [])])


@command("configureFailPoint")
async def cmd_configure_fail_point(peer: Peer, body: SON, db: str, conn_id: int,
                                   peer_cert: Any) -> SON:
    if body["configureFailPoint"] != "failCommand":
        raise CommandError(2, "only the failCommand fail point exists here")
    mode = body.get("mode", "alwaysOn")
    data = dict(body.get("data", {}))
    if mode == "off":
        peer.fail_points.clear()
        return SON()
    if mode == "alwaysOn":
        data["alwaysOn"] = True
    elif isinstance(mode, dict) and "times" in mode:
        data["times"] = int(mode["times"])
    else:
        raise CommandError(2, f"mode {mode!r} is not supported (alwaysOn, off, {{times: n}})")
    try:
        peer.add_fail_point(data)
    except ValueError as e:
        raise CommandError(2, str(e)) from e
    return SON()


# ---------------------------------------------------------------------------------------------
# HTTP control port
# ---------------------------------------------------------------------------------------------

async def control_request(peer: Peer, method: str, path: str, body: Any) -> tuple[int, Any]:
    if method == "GET" and path == "/state":
        return 200, {
            "oplog_first_seq": peer.oplog[0].seq if peer.oplog else None,
            "oplog_last_seq": peer.last_seq,
            "oplog_len": len(peer.oplog),
            "trimmed_through": peer.trimmed_through,
            "connections": len(peer.connections),
            "open_cursors": len(peer.cursors),
            "waiting_get_mores": peer.waiting_get_mores,
            "topology_counter": peer.topology_counter,
            "collections": {f"{d}.{c}": len(v) for (d, c), v in peer.collections.items()},
            "fail_points": len(peer.fail_points),
        }
    if method == "GET" and path == "/commands":
        return 200, peer.received
    if method == "DELETE" and path == "/commands":
        peer.received.clear()
        return 200, {"ok": True}
    if method == "POST" and path == "/fail":
        try:
            peer.add_fail_point(body or {})
        except (ValueError, TypeError) as e:
            return 400, {"error": str(e)}
        return 200, {"ok": True}
    if method == "POST" and path == "/fail/off":
        peer.fail_points.clear()
        return 200, {"ok": True}
    if method == "POST" and path == "/drop-connections":
        # {"restart": true} also forgets every cursor and takes a new processId, as a restarted
        # mongod would (a getMore on an old cursor then fails with 43 CursorNotFound).
        n = len(peer.connections)
        for writer in list(peer.connections.values()):
            writer.transport.abort()
        peer.connections.clear()
        if (body or {}).get("restart"):
            peer.cursors.clear()
            peer.process_id = ObjectId()
            peer.topology_counter = 0
            peer.topology_changed.set()
            peer.topology_changed = asyncio.Event()
        return 200, {"dropped": n}
    if method == "POST" and path == "/trim":
        keep = int((body or {}).get("keep", 0))
        peer.trim(keep)
        return 200, {"trimmed_through": peer.trimmed_through}
    if method == "POST" and path == "/step-down":
        peer.bump_topology()
        return 200, {"topology_counter": peer.topology_counter}
    if method == "POST" and path == "/insert":
        # Writes without a driver: {db, coll, documents: [extended JSON]}.
        docs = [json_util.loads(json.dumps(d), json_options=json_util.CANONICAL_JSON_OPTIONS)
                for d in (body or {}).get("documents", [])]
        reply = await cmd_insert(peer, SON([("insert", body["coll"]), ("documents", docs)]),
                                 body["db"], 0, None)
        return 200, json.loads(json_util.dumps(reply))
    return 404, {"error": f"no control endpoint {method} {path}"}


async def serve_control(peer: Peer, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            method, target, _ = line.decode("latin-1").split(" ", 2)
            length = 0
            while True:
                h = await reader.readline()
                if h in (b"\r\n", b"\n", b""):
                    break
                name, _, value = h.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            raw = await reader.readexactly(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
                status, answer = await control_request(peer, method, target.split("?")[0], body)
            except (ValueError, KeyError, TypeError) as e:
                status, answer = 400, {"error": f"{type(e).__name__}: {e}"}
            data = json.dumps(answer).encode()
            writer.write(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                         f"\r\n".encode() + data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        pass
    finally:
        writer.close()


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.tls_cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.tls_cert, args.tls_key)
    if args.tls_client_ca:
        ctx.load_verify_locations(args.tls_client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if args.tls_client_cert == "required" \
            else ssl.CERT_OPTIONAL
    return ctx


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="wire port on 127.0.0.1 (0: any)")
    parser.add_argument("--control-port", type=int, default=0, help="HTTP control port (0: any)")
    parser.add_argument("--set-name", default="rs0", help="replica-set name (hello setName)")
    parser.add_argument("--oplog-size", type=int, default=10_000,
                        help="oplog entries kept; older ones are trimmed (history lost)")
    parser.add_argument("--host-name", default="127.0.0.1",
                        help="host the replica-set member calls itself (hosts/me/primary)")
    parser.add_argument("--tls-cert", help="server certificate (PEM); enables TLS")
    parser.add_argument("--tls-key", help="server private key (PEM)")
    parser.add_argument("--tls-client-ca", help="CA (PEM) that client certificates chain to")
    parser.add_argument("--tls-client-cert", choices=["required", "optional"],
                        default="required", help="with --tls-client-ca")
    parser.add_argument("--user", action="append", default=[], metavar="NAME:PASSWORD",
                        help="a SCRAM-SHA-256/SCRAM-SHA-1 user of the admin database")
    parser.add_argument("--require-auth", action="store_true",
                        help="refuse commands (code 13) on connections that did not log in")
    args = parser.parse_args()
    if any(":" not in u for u in args.user):
        parser.error("--user takes NAME:PASSWORD")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    peer = Peer(args)
    wire = await asyncio.start_server(peer.serve_client, "127.0.0.1", args.port,
                                      ssl=tls_context(args))
    port = wire.sockets[0].getsockname()[1]
    peer.host = f"{args.host_name}:{port}"
    control = await asyncio.start_server(lambda r, w: serve_control(peer, r, w), "127.0.0.1",
                                         args.control_port)
    control_port = control.sockets[0].getsockname()[1]
    tls = "&tls=true" if args.tls_cert else ""
    print(json.dumps({"port": port, "control_port": control_port,
                      "uri": f"mongodb://{peer.host}/?replicaSet={args.set_name}{tls}"}),
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
