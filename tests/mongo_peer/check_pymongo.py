#!/usr/bin/env python3
"""Self-checks of the MongoDB wire peer (peer.py) through pymongo, the way a platform connector
writes health events. Run by tests/mongo_peer.rs; by hand:

    python check_pymongo.py SCENARIO MONGODB_URI CONTROL_URL [TLS_DIR]

Each check prints `PASS <name>`; the first failed check raises (exit status 1). Scenarios:
crud, resume, post_batch_token, history_lost, injected_errors, token_upsert, tls, x509, scram.
"""

from __future__ import annotations

import datetime
import json
import sys
import threading
import time
import urllib.request

import pymongo
from bson.son import SON
from pymongo.errors import AutoReconnect, OperationFailure

UTC = datetime.timezone.utc
DB, COLL, TOKENS = "HealthEventsDatabase", "HealthEvents", "ResumeTokens"


class Control:
    """The peer's HTTP control port."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def commands(self, name: str | None = None) -> list[dict]:
        got = self.call("GET", "/commands")
        return [c for c in got if name is None or c.get("command") == name]


def wait_for_held_get_more(ctl: Control) -> None:
    """Until the peer holds a change-stream getMore (so a drop hits a request in flight)."""
    deadline = time.monotonic() + 20
    while ctl.call("GET", "/state")["waiting_get_mores"] < 1:
        if time.monotonic() > deadline:
            raise AssertionError("FAIL no getMore was held within 20 s")
        time.sleep(0.05)


def check(name: str, cond: bool, detail: object = "") -> None:
    if not cond:
        raise AssertionError(f"FAIL {name}: {detail}")
    print(f"PASS {name}", flush=True)


def expect_code(name: str, code: int, fn) -> OperationFailure:
    try:
        fn()
    except OperationFailure as e:
        check(name, e.code == code, f"code {e.code}, wanted {code}: {e}")
        return e
    raise AssertionError(f"FAIL {name}: no error, wanted code {code}")


def health_event(i: int, base: datetime.datetime) -> dict:
    """A HealthEvents document shaped like a platform connector's (nvsentinel-datastore.md §4)."""
    return {
        "createdAt": base + datetime.timedelta(seconds=i // 3),  # ties on createdAt on purpose
        "healthevent": {
            "version": 1,
            "agent": "gpu-health-monitor",
            "componentclass": "GPU",
            "checkname": "GpuXidError",
            "isfatal": i % 2 == 0,
            "ishealthy": False,
            "message": f"XID 79 #{i}",
            "recommendedaction": 15,
            "errorcode": ["79"],
            "nodename": f"node-{i % 4}",
            "generatedtimestamp": {"seconds": 1767225600 + i, "nanos": 0},
        },
        "healtheventstatus": {"nodequarantined": None, "userpodsevictionstatus": {"status": ""}},
    }


def client(uri: str, **kw) -> pymongo.MongoClient:
    kw.setdefault("serverSelectionTimeoutMS", 5000)
    return pymongo.MongoClient(uri, **kw)


def legacy_is_master(c: pymongo.MongoClient) -> bool:
    """Sends `{isMaster: 1}` as an OP_QUERY on admin.$cmd over a raw socket; the `ismaster`
    field of the OP_REPLY document."""
    import socket
    import struct

    import bson
    host, port = c.address
    query = b"\x00\x00\x00\x00admin.$cmd\x00" + struct.pack("<ii", 0, -1) + \
        bson.encode({"isMaster": 1})
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(struct.pack("<iiii", 16 + len(query), 7, 0, 2004) + query)
        head = sock.recv(16, socket.MSG_WAITALL)
        length, _, response_to, opcode = struct.unpack("<iiii", head)
        rest = b""
        while len(rest) < length - 16:
            rest += sock.recv(length - 16 - len(rest))
    if opcode != 1 or response_to != 7:
        return False
    flags, cursor_id, start, returned = struct.unpack_from("<iqii", rest, 0)
    return returned == 1 and bson.decode(rest[20:]).get("ismaster")


def scenario_crud(uri: str, ctl: Control) -> None:
    c = client(uri)
    col = c[DB][COLL]
    check("hello reports a replica-set primary",
          c.admin.command("hello")["setName"] == "rs0" and
          c.admin.command("hello")["isWritablePrimary"] is True and
          c.admin.command("hello")["maxWireVersion"] == 21)
    check("ping", c.admin.command("ping")["ok"] == 1.0)
    check("legacy OP_QUERY isMaster is answered with OP_REPLY", legacy_is_master(c) is True)
    tv = c.admin.command("hello")["topologyVersion"]
    started = time.monotonic()
    held = c.admin.command(SON([("hello", 1), ("topologyVersion", tv), ("maxAwaitTimeMS", 400)]))
    waited = time.monotonic() - started
    check("a waiting hello is held up to maxAwaitTimeMS", 0.35 <= waited < 3 and
          held["topologyVersion"] == tv, waited)
    timer = threading.Timer(0.3, lambda: ctl.call("POST", "/step-down"))
    timer.start()
    started = time.monotonic()
    woken = c.admin.command(SON([("hello", 1), ("topologyVersion", tv),
                                 ("maxAwaitTimeMS", 10000)]))
    waited = time.monotonic() - started
    timer.join()
    check("a topology change answers a waiting hello at once with the new topologyVersion",
          waited < 6 and woken["topologyVersion"]["counter"] == tv["counter"] + 1, waited)
    check("buildInfo", c.admin.command("buildInfo")["version"].startswith("7."))
    base = datetime.datetime(2026, 1, 1, tzinfo=UTC)
    ids = col.insert_many([health_event(i, base) for i in range(25)]).inserted_ids
    check("insert_many", len(ids) == 25 and col.count_documents({}) == 25)
    dup = None
    try:
        col.insert_one({"_id": ids[0]})
    except pymongo.errors.DuplicateKeyError as e:
        dup = e
    check("duplicate _id is error 11000", dup is not None and dup.code == 11000, dup)
    check("listCollections", COLL in c[DB].list_collection_names())

    # Keyset pages over (createdAt, _id), as a backfill walks them.
    expected = sorted(col.find({}), key=lambda d: (d["createdAt"], d["_id"]))
    pages, last = [], None
    while True:
        filt = {} if last is None else {"$or": [
            {"createdAt": {"$gt": last[0]}},
            {"createdAt": last[0], "_id": {"$gt": last[1]}}]}
        page = list(col.find(filt).sort([("createdAt", 1), ("_id", 1)]).limit(10))
        if not page:
            break
        pages.append(page)
        last = (page[-1]["createdAt"], page[-1]["_id"])
    got = [d["_id"] for p in pages for d in p]
    check("keyset pages: 10+10+5, in (createdAt, _id) order, each event once",
          [len(p) for p in pages] == [10, 10, 5] and got == [d["_id"] for d in expected],
          [len(p) for p in pages])
    newest = list(col.find({"createdAt": {"$gte": base, "$lte": base + datetime.timedelta(
        seconds=100)}}).sort([("createdAt", -1), ("_id", -1)]).limit(4))
    check("descending sort with a createdAt range and limit",
          [d["_id"] for d in newest] == [d["_id"] for d in reversed(expected)][:4])
    ctl.call("DELETE", "/commands")
    batched = list(col.find({"healthevent.isfatal": True}).batch_size(3))
    check("batchSize: getMore fetches the rest",
          len(batched) == 13 and len(ctl.commands("getMore")) == 4,
          (len(batched), len(ctl.commands("getMore"))))
    check("dotted-path filter and $in",
          col.count_documents({"healthevent.nodename": {"$in": ["node-0", "node-1"]}}) == 13)
    check("delete_many", col.delete_many({"healthevent.isfatal": False}).deleted_count == 12
          and col.count_documents({}) == 13)
    check("estimated_document_count (count command)", col.estimated_document_count() == 13)
    answer = ctl.call("POST", "/insert", {"db": DB, "coll": COLL, "documents": [
        {"createdAt": {"$date": "2026-01-02T00:00:00Z"}, "n": "via control"}]})
    got = col.find_one({"n": "via control"})
    check("POST /insert stores extended JSON as BSON (a date stays a date)",
          answer.get("n") == 1 and got is not None and
          got["createdAt"] == datetime.datetime(2026, 1, 2, tzinfo=UTC).replace(tzinfo=None),
          (answer, got))
    c.close()
    check("client close sends endSessions", len(ctl.commands("endSessions")) >= 1)


def scenario_resume(uri: str, ctl: Control) -> None:
    c = client(uri)
    col = c[DB][COLL]
    base = datetime.datetime(2026, 2, 1, tzinfo=UTC)
    pipeline = [{"$match": {"operationType": "insert"}}]
    with col.watch(pipeline, full_document="updateLookup", max_await_time_ms=200) as cs:
        col.insert_many([health_event(i, base) for i in range(3)])
        col.update_one({}, {"$set": {"healtheventstatus.nodequarantined": "Quarantined"}})
        c[DB]["other"].insert_one({"x": 1})
        events = [cs.next() for _ in range(2)]
        token = events[1]["_id"]
    check("events carry _id token, operationType, clusterTime, ns, documentKey, fullDocument",
          all(set(e) >= {"_id", "operationType", "clusterTime", "ns", "documentKey",
                         "fullDocument"} for e in events) and
          events[0]["ns"] == {"db": DB, "coll": COLL} and
          events[0]["documentKey"]["_id"] == events[0]["fullDocument"]["_id"])
    check("tokens are {_data: hex} and sort in event order",
          set(token) == {"_data"} and events[0]["_id"]["_data"] < token["_data"])
    c.close()

    # Reconnect with a new client and resume after the second event.
    c = client(uri)
    col = c[DB][COLL]
    with col.watch(pipeline, full_document="updateLookup", resume_after=token,
                   max_await_time_ms=200) as cs:
        third = cs.next()
        check("resumeAfter across a reconnect: the next insert, no update, no other collection",
              third["fullDocument"]["healthevent"]["message"] == "XID 79 #2" and
              third["operationType"] == "insert")
        check("no more events after the resumed one", cs.try_next() is None)
        aggregates = ctl.commands("aggregate")
        check("the aggregate carried resumeAfter",
              aggregates[-1]["body"]["pipeline"][0]["$changeStream"].get("resumeAfter") == token)

    # The connection drops under a getMore in flight: pymongo resumes by itself.
    with col.watch(pipeline, full_document="updateLookup", resume_after=third["_id"],
                   max_await_time_ms=3000) as cs:
        opened = len(ctl.commands("aggregate"))
        dropped = []

        def drop_then_insert() -> None:
            wait_for_held_get_more(ctl)
            dropped.append(ctl.call("POST", "/drop-connections")["dropped"])
            with client(uri) as writer:
                writer[DB][COLL].insert_one(health_event(3, base))

        timer = threading.Timer(0.0, drop_then_insert)
        timer.start()
        fourth = None
        for _ in range(20):
            try:
                fourth = cs.try_next()
            except AutoReconnect:
                continue
            if fourth is not None:
                break
        timer.join()
        check("a dropped connection resumes automatically and delivers the next event",
              dropped and dropped[0] >= 1 and fourth is not None and
              fourth["fullDocument"]["healthevent"]["message"] == "XID 79 #3", fourth)
        after = ctl.commands("aggregate")
        resumed = after[-1]["body"]["pipeline"][0]["$changeStream"]
        check("the automatic resume re-ran aggregate with a token", len(after) > opened and (
              "resumeAfter" in resumed or "startAfter" in resumed), resumed)

        # A restarted server forgets its cursors: the next getMore fails with 43
        # CursorNotFound (resumable) and the stream resumes with its token.
        check("an idle stream", cs.try_next() is None)
        opened = len(ctl.commands("aggregate"))
        ctl.call("POST", "/drop-connections", {"restart": True})
        col.insert_one(health_event(4, base))
        fifth = None
        for _ in range(20):
            try:
                fifth = cs.try_next()
            except AutoReconnect:
                continue
            if fifth is not None:
                break
        check("after a restart (cursors forgotten) the stream resumes and delivers the next event",
              fifth is not None and len(ctl.commands("aggregate")) > opened and
              fifth["fullDocument"]["healthevent"]["message"] == "XID 79 #4", fifth)
    c.close()


def scenario_post_batch_token(uri: str, ctl: Control) -> None:
    c = client(uri)
    db = c[DB]
    db[COLL].insert_one(health_event(0, datetime.datetime(2026, 3, 1, tzinfo=UTC)))
    opened = db.command("aggregate", COLL, pipeline=[{"$changeStream": {}}], cursor={})
    cur = opened["cursor"]
    check("an empty first batch has a postBatchResumeToken",
          cur["firstBatch"] == [] and "_data" in cur["postBatchResumeToken"])
    started = time.monotonic()
    more = db.command("getMore", cur["id"], collection=COLL, maxTimeMS=400)["cursor"]
    waited = time.monotonic() - started
    check("getMore waits up to maxTimeMS, then an empty batch with a postBatchResumeToken",
          more["nextBatch"] == [] and "_data" in more["postBatchResumeToken"] and
          0.35 <= waited < 3, waited)
    hwm = more["postBatchResumeToken"]
    db["other"].insert_one({"x": 1})
    more = db.command("getMore", cur["id"], collection=COLL, maxTimeMS=200)["cursor"]
    check("the token advances over writes the stream filters out",
          more["nextBatch"] == [] and more["postBatchResumeToken"]["_data"] > hwm["_data"])
    hwm = more["postBatchResumeToken"]
    db.command("killCursors", COLL, cursors=[cur["id"]])
    db[COLL].insert_one({"n": "after"})
    with db[COLL].watch(resume_after=hwm, max_await_time_ms=200) as cs:
        ev = cs.next()
        check("resuming from an empty batch's token gives only newer events",
              ev["fullDocument"]["n"] == "after" and cs.try_next() is None)
        check("after an empty batch pymongo's resume_token is its postBatchResumeToken, "
              "newer than the last event's _id",
              cs.resume_token is not None and cs.resume_token != ev["_id"] and
              cs.resume_token["_data"] > ev["_id"]["_data"], (cs.resume_token, ev["_id"]))
    waiter = db.command("aggregate", COLL, pipeline=[{"$changeStream": {}}], cursor={})
    started = time.monotonic()
    import threading
    t = threading.Timer(0.3, lambda: client(uri)[DB][COLL].insert_one({"n": "late"}))
    t.start()
    more = db.command("getMore", waiter["cursor"]["id"], collection=COLL,
                      maxTimeMS=10000)["cursor"]
    waited = time.monotonic() - started
    t.join()
    check("a waiting getMore returns as soon as an event arrives",
          len(more["nextBatch"]) == 1 and waited < 6 and
          more["postBatchResumeToken"] == more["nextBatch"][0]["_id"], waited)
    c.close()


def scenario_history_lost(uri: str, ctl: Control) -> None:
    c = client(uri)
    col = c[DB][COLL]
    with col.watch(max_await_time_ms=100) as cs:
        col.insert_many([{"n": i} for i in range(5)])
        first = cs.next()["_id"]
        last = first
        for _ in range(4):
            last = cs.next()["_id"]
    ctl.call("POST", "/trim", {"keep": 2})
    expect_code("a token older than the oplog: 286 ChangeStreamHistoryLost on aggregate", 286,
                lambda: col.watch(resume_after=first))
    with col.watch(resume_after=last, max_await_time_ms=100) as cs:
        check("a token still in the oplog resumes", cs.try_next() is None)
    stream = col.watch(max_await_time_ms=100)
    col.insert_many([{"n": i} for i in range(3)])
    ctl.call("POST", "/trim", {"keep": 0})
    expect_code("a cursor that fell behind: 286 on getMore", 286, stream.try_next)
    stream.close()
    expect_code("a token the server cannot parse: 260 InvalidResumeToken", 260,
                lambda: col.watch(resume_after={"_data": "not-a-token"}))
    c.close()


def scenario_injected_errors(uri: str, ctl: Control) -> None:
    c = client(uri, retryReads=False)
    col = c[DB][COLL]
    ctl.call("POST", "/fail", {"commands": ["aggregate"], "code": 286})
    e = expect_code("injected 286 on aggregate", 286, lambda: col.watch())
    check("286 carries no resumable label",
          not e.has_error_label("ResumableChangeStreamError"))
    with col.watch(max_await_time_ms=100) as cs:
        ctl.call("POST", "/fail", {"commands": ["getMore"], "code": 260})
        expect_code("injected 260 on getMore is surfaced", 260, cs.try_next)
    with col.watch(max_await_time_ms=100) as cs:
        before = len(ctl.commands("aggregate"))
        ctl.call("POST", "/fail", {"commands": ["getMore"], "code": 10107})
        col.insert_one({"n": "after step-down"})
        ev = None
        for _ in range(20):
            try:
                ev = cs.try_next()
            except AutoReconnect:
                continue
            if ev is not None:
                break
        check("NotWritablePrimary (10107) on getMore: labelled resumable, stream resumes",
              ev is not None and ev["fullDocument"]["n"] == "after step-down" and
              len(ctl.commands("aggregate")) > before, ev)
    opened = c[DB].command("aggregate", COLL, pipeline=[{"$changeStream": {}}], cursor={})
    ctl.call("POST", "/fail", {"commands": ["getMore"], "code": 10107})
    labels = None
    try:
        c[DB].command("getMore", opened["cursor"]["id"], collection=COLL, maxTimeMS=100)
    except (OperationFailure, pymongo.errors.NotPrimaryError) as err:
        labels = (err.details or {}).get("errorLabels")
    check("10107 on a change-stream getMore is labelled ResumableChangeStreamError",
          labels == ["ResumableChangeStreamError"], labels)
    state = ctl.call("GET", "/state")
    check("10107 bumped the topologyVersion", state["topology_counter"] >= 1, state)
    ctl.call("POST", "/fail", {"commands": ["insert"], "code": 10107})
    col.insert_one({"n": "retried"})
    check("an insert failing with 10107 (RetryableWriteError) is retried once and stored once",
          col.count_documents({"n": "retried"}) == 1 and
          len([x for x in ctl.commands("insert") if x["body"]["documents"][0].get("n") ==
               "retried"]) == 2)
    ctl.call("POST", "/fail", {"commands": ["find"], "closeConnection": True})
    dropped = None
    try:
        col.find_one({})
    except AutoReconnect as err:
        dropped = err
    check("closeConnection: the client sees a network error", dropped is not None)
    c.admin.command({"configureFailPoint": "failCommand", "mode": {"times": 1},
                     "data": {"failCommands": ["ping"], "errorCode": 91}})
    try:
        c.admin.command("ping")
        code = None
    except pymongo.errors.NotPrimaryError as err:  # pymongo's class for "node is shutting down"
        code = (err.details or {}).get("code")
    check("configureFailPoint (wire) injects ShutdownInProgress (91)", code == 91, code)
    check("the fail point was used once", c.admin.command("ping")["ok"] == 1.0)
    c.close()


def scenario_token_upsert(uri: str, ctl: Control) -> None:
    c = client(uri)
    db = c[DB]
    with db[COLL].watch(max_await_time_ms=100) as cs:
        db[COLL].insert_many([{"n": 1}, {"n": 2}])
        t1, t2 = cs.next()["_id"], cs.next()["_id"]
        r = db[TOKENS].update_one({"clientName": "event-exporter"},
                                  {"$set": {"resumeToken": t1}}, upsert=True)
        check("first save upserts {clientName, resumeToken}", r.upserted_id is not None and
              r.matched_count == 0)
        r = db[TOKENS].update_one({"clientName": "event-exporter"},
                                  {"$set": {"resumeToken": t2}}, upsert=True)
        check("second save updates the same document", r.upserted_id is None and
              r.matched_count == 1 and r.modified_count == 1)
        check("token writes do not show up in the HealthEvents stream", cs.try_next() is None)
    docs = list(db[TOKENS].find({"clientName": "event-exporter"}))
    check("one token document with the newest token",
          len(docs) == 1 and docs[0]["resumeToken"] == t2 and
          set(docs[0]) == {"_id", "clientName", "resumeToken"}, docs)
    r = db[TOKENS].replace_one({"clientName": "other"},
                               {"clientName": "other", "resumeToken": t1}, upsert=True)
    check("replace_one with upsert", r.upserted_id is not None and
          db[TOKENS].count_documents({}) == 2)
    got = db[TOKENS].find_one({"clientName": "event-exporter"}, {"resumeToken": 1, "_id": 0})
    check("projection", got == {"resumeToken": t2}, got)
    with db[COLL].watch(resume_after=docs[0]["resumeToken"], max_await_time_ms=100) as cs:
        check("the stored token resumes after its event", cs.try_next() is None)
    c.close()


def scenario_tls(uri: str, ctl: Control, tls_dir: str) -> None:
    c = client(uri, tls=True, tlsCAFile=f"{tls_dir}/ca.crt")
    c[DB][COLL].insert_one({"n": "over tls"})
    check("CA-only TLS: insert and find", c[DB][COLL].find_one({})["n"] == "over tls")
    c.close()
    bad = client(uri, tls=True, serverSelectionTimeoutMS=1500)
    failed = False
    try:
        bad.admin.command("ping")
    except pymongo.errors.ServerSelectionTimeoutError:
        failed = True
    check("a client without the test CA refuses the peer's certificate", failed)
    bad.close()


def scenario_x509(uri: str, ctl: Control, tls_dir: str) -> None:
    c = client(uri, tls=True, tlsCAFile=f"{tls_dir}/ca.crt",
               tlsCertificateKeyFile=f"{tls_dir}/client.pem", authMechanism="MONGODB-X509")
    check("MONGODB-X509: ping", c.admin.command("ping")["ok"] == 1.0)
    users = [x["user"] for x in ctl.commands("authenticated")]
    check("the peer authenticated the certificate subject", "CN=mongo-client" in users, users)
    c.close()
    nocert = client(uri, tls=True, tlsCAFile=f"{tls_dir}/ca.crt", serverSelectionTimeoutMS=1500)
    failed = False
    try:
        nocert.admin.command("ping")
    except (pymongo.errors.ServerSelectionTimeoutError, AutoReconnect):
        failed = True
    check("a client without a certificate is refused (client certificate required)", failed)
    nocert.close()


def scenario_scram(uri: str, ctl: Control, tls_dir: str) -> None:
    """The managed-database case: CA-only TLS and SCRAM credentials in the URI. The peer runs
    with --user app:s3cret --require-auth."""
    tls = {"tls": True, "tlsCAFile": f"{tls_dir}/ca.crt"}
    anonymous = client(uri, **tls)
    expect_code("without credentials a read is refused (13 Unauthorized)", 13,
                lambda: anonymous[DB][COLL].find_one({}))
    anonymous.close()
    with_uri = uri.replace("mongodb://", "mongodb://app:s3cret@", 1)
    c = client(with_uri, **tls)
    c[DB][COLL].insert_one({"n": "scram"})
    check("SCRAM-SHA-256 (negotiated) over CA-only TLS: insert and find",
          c[DB][COLL].find_one({})["n"] == "scram")
    logins = ctl.commands("authenticated")
    check("the peer verified the SCRAM-SHA-256 proof",
          any(x["user"] == "app" and x["mechanism"] == "SCRAM-SHA-256" for x in logins), logins)
    c.close()
    sha1 = client(with_uri, authMechanism="SCRAM-SHA-1", **tls)
    check("SCRAM-SHA-1", sha1[DB][COLL].count_documents({}) == 1)
    sha1.close()
    wrong = client(uri.replace("mongodb://", "mongodb://app:wrong@", 1), **tls)
    expect_code("a wrong password fails authentication (18)", 18,
                lambda: wrong[DB][COLL].find_one({}))
    wrong.close()


SCENARIOS = {
    "scram": scenario_scram,
    "crud": scenario_crud,
    "resume": scenario_resume,
    "post_batch_token": scenario_post_batch_token,
    "history_lost": scenario_history_lost,
    "injected_errors": scenario_injected_errors,
    "token_upsert": scenario_token_upsert,
    "tls": scenario_tls,
    "x509": scenario_x509,
}

if __name__ == "__main__":
    name, uri, control = sys.argv[1], sys.argv[2], sys.argv[3]
    SCENARIOS[name](uri, Control(control), *sys.argv[4:])
    print(f"DONE {name}", flush=True)
