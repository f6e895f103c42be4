#!/usr/bin/env python3
"""An RKI backend over MQTT, written from docs/PROTOCOL.md §3, §4 and §12 alone.

Needs paho-mqtt 2.x and the standard library: the postcard encoding of the few messages used is
written out by hand below (varints, strings, sequences, enum indices).

It connects as ``backend@{org}~{name}`` (to the gateway's own endpoint, or to the external broker
the gateway keeps the backends' credentials in), asks for the events after the last one it processed
(``--after``), creates one download task (``CreateTask``, with ``--request-id`` as its
idempotency key), and prints every event as one JSON line, in ``seq`` order, exactly once,
acknowledging them, until the task is done. Exit status 0 when the task is done, 1 otherwise.

    RKI_BACKEND_SECRET=… python3 backend.py --org acme --name erp-1 --group warehouse \
        --request-id 1001 --port 1883
"""

import argparse
import hashlib
import hmac
import json
import os
import queue
import sys
import time

import paho.mqtt.client as mqtt

# ---------------------------------------------------------------- keys (§12.1)


def derive(secret: bytes, label: bytes, org: str, name: str) -> bytes:
    return hmac.new(secret, label + org.encode() + b"\x00" + name.encode(), "sha256").digest()


def mqtt_password(secret: bytes, org: str, name: str) -> str:
    return derive(secret, b"rki/v1 backend mqtt password", org, name).hex()


def mac_key(secret: bytes, org: str, name: str) -> bytes:
    return derive(secret, b"rki/v1 backend mac key", org, name)


# ---------------------------------------------------------------- postcard (§3)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def string(text: str) -> bytes:
    raw = text.encode()
    return varint(len(raw)) + raw


def seq(items, encode) -> bytes:
    return varint(len(items)) + b"".join(encode(i) for i in items)


class Reader:
    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def varint(self) -> int:
        n, shift = 0, 0
        for _ in range(10):
            if self.at >= len(self.data):
                raise ValueError("truncated varint")
            byte = self.data[self.at]
            self.at += 1
            n |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return n
            shift += 7
        raise ValueError("varint too long")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def raw(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise ValueError("truncated")
        out = self.data[self.at : self.at + n]
        self.at += n
        return out

    def bytes(self) -> bytes:
        return self.raw(self.varint())

    def string(self) -> str:
        return self.bytes().decode()

    def seq(self, decode):
        return [decode() for _ in range(self.varint())]


# ---------------------------------------------------------------- frame (§4)

BACKEND_REQUEST, BACKEND_ANSWER, BACKEND_EVENT = 8, 9, 11


def seal(key: bytes, body: bytes) -> bytes:
    tag = hmac.new(key, b"\x01" + body, "sha256").digest()
    return b"\x01" + varint(len(body)) + body + tag


def open_frame(key: bytes, frame: bytes):
    """The body's reader after the tag verified, or None."""
    r = Reader(frame)
    if r.raw(1) != b"\x01":
        return None
    body = r.bytes()
    tag = r.raw(32)
    if r.at != len(frame):
        return None
    if not hmac.compare_digest(tag, hmac.new(key, b"\x01" + body, "sha256").digest()):
        return None
    return Reader(body)


# ---------------------------------------------------------------- messages (§12.4, §12.6)


def task_order(devices, group, key_source, slot, expiry_days) -> bytes:
    target = varint(0) + seq(devices, string) if devices else varint(1) + string(group)
    return target + string(key_source) + varint(slot) + varint(expiry_days)


def create_task(order: bytes) -> bytes:
    return varint(0) + order


def events_request(after: int) -> bytes:
    return varint(5) + varint(after)


ANSWERS = ["TaskCreated", "Preview", "Stopped", "Unlocked", "TaskState", "Events", "Gap", "Refused"]


def decode_answer(r: Reader) -> dict:
    request_id = r.varint()
    kind = r.varint()
    out = {"request_id": request_id, "answer": ANSWERS[kind] if kind < len(ANSWERS) else kind}
    if kind == 0:
        out.update(task_id=r.varint(), executions=r.varint())
    elif kind == 5:
        out.update(after=r.varint(), last=r.varint())
    elif kind == 6:
        out.update(after=r.varint(), oldest=r.varint())
    elif kind == 7:
        out.update(code=r.varint(), reason=r.string())
    return out


def decode_event(r: Reader) -> dict:
    seq_no = r.varint()
    kind = r.varint()
    if kind == 0:
        return {"seq": seq_no, "event": "task_created", "task_id": r.varint(), "backend": r.string(),
                "request_id": r.varint(), "executions": r.varint()}
    if kind == 1:
        return {"seq": seq_no, "event": "execution_ended", "task_id": r.varint(), "execution_id": r.varint(),
                "sn": r.string(), "outcome": r.string(), "error_code": r.zigzag(), "meaning": r.string(),
                "ksn": r.bytes().hex().upper(), "kcv": r.bytes().hex().upper(), "at_ms": r.varint()}
    if kind == 2:
        return {"seq": seq_no, "event": "task_done", "task_id": r.varint(), "succeeded": r.varint(),
                "failed": r.varint(), "expired": r.varint(), "terminated": r.varint()}
    return {"seq": seq_no, "event": kind}


# ---------------------------------------------------------------- the backend


class Backend:
    def __init__(self, args):
        secret = bytes.fromhex(os.environ.get("RKI_BACKEND_SECRET", args.secret or "").strip())
        self.org, self.name = args.org, args.name
        self.key = mac_key(secret, self.org, self.name)
        self.client_id = f"backend@{self.org}~{self.name}"
        self.req = f"rki/v1/backend/{self.org}/{self.name}/req"
        self.reply = f"rki/v1/backend/{self.org}/{self.name}/reply"
        self.events = f"rki/v1/backend/{self.org}/{self.name}/events"
        self.counter = 0
        self.inbox = queue.Queue()
        self.subscribed = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                  protocol=mqtt.MQTTv311, clean_session=True)
        self.client.username_pw_set(self.client_id, mqtt_password(secret, self.org, self.name))
        self.client.on_connect = self.on_connect
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.subscribed.put(mid)
        self.client.on_message = lambda c, u, m: self.inbox.put(m)

    def on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            print(json.dumps({"connect_refused": str(reason_code)}), file=sys.stderr)
            return
        client.subscribe([(self.reply, 1), (self.events, 1)])

    def next_counter(self) -> int:
        self.counter = max(time.time_ns() // 1000, self.counter + 1)
        return self.counter

    def send(self, request_id: int, request: bytes):
        body = string(self.org) + varint(self.next_counter()) + varint(BACKEND_REQUEST) + varint(request_id) + request
        self.client.publish(self.req, seal(self.key, body), qos=1)

    def receive(self, timeout: float):
        """The next verified message: ("answer", dict) or ("event", dict), or None."""
        try:
            message = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        r = open_frame(self.key, message.payload)
        if r is None or r.string() != self.org:
            return ("dropped", {})
        r.varint()  # counter: not checked against the previous one (§12.3)
        kind = r.varint()
        if kind == BACKEND_ANSWER and message.topic == self.reply:
            return ("answer", decode_answer(r))
        if kind == BACKEND_EVENT and message.topic == self.events:
            return ("event", decode_event(r))
        return ("dropped", {})


# Seconds without an answer before a request is sent again.
RESEND_AFTER_S = 3.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--org", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--secret", help="better: the RKI_BACKEND_SECRET environment variable")
    p.add_argument("--group")
    p.add_argument("--devices", help="comma-separated SNs")
    p.add_argument("--key-source", default="")
    p.add_argument("--slot", type=int, default=1)
    p.add_argument("--expiry-days", type=int, default=0)
    p.add_argument("--request-id", type=int, required=True)
    p.add_argument("--after", type=int, default=0, help="the last event already processed")
    p.add_argument("--timeout", type=float, default=120)
    args = p.parse_args()
    devices = args.devices.split(",") if args.devices else []
    if not devices and not args.group:
        p.error("name --group or --devices")

    b = Backend(args)
    b.client.connect(args.host, args.port, keepalive=30)
    b.client.loop_start()
    b.subscribed.get(timeout=10)

    processed = args.after
    events_asked = None  # the request id of the outstanding Events request
    events_sent = 0.0  # when it was last sent
    next_request_id = args.request_id + 1

    def ask_events():
        nonlocal events_asked, events_sent, next_request_id
        events_asked = next_request_id
        next_request_id += 1
        b.send(events_asked, events_request(processed))
        events_sent = time.monotonic()

    ask_events()
    order = task_order(devices, args.group, args.key_source, args.slot, args.expiry_days)
    b.send(args.request_id, create_task(order))
    created_sent = time.monotonic()
    task_id, done = None, None
    since_ack, last_ack = 0, time.monotonic()
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and done is None:
        # A request without an answer is sent again, with the same request id and a new counter
        # (PROTOCOL.md section 12.5): it may have been lost, or dropped as a replay when two
        # gateway nodes handled two of our requests out of order. A repeated CreateTask creates
        # nothing new; it gets the first answer.
        now = time.monotonic()
        if task_id is None and now - created_sent >= RESEND_AFTER_S:
            b.send(args.request_id, create_task(order))
            created_sent = now
        if events_asked is not None and now - events_sent >= RESEND_AFTER_S:
            b.send(events_asked, events_request(processed))
            events_sent = now
        got = b.receive(timeout=0.5)
        if got is not None:
            kind, m = got
            if kind == "answer" and m["request_id"] == args.request_id:
                print(json.dumps(m), flush=True)
                if m["answer"] != "TaskCreated":
                    return 1
                task_id = m["task_id"]
            elif kind == "answer" and m["request_id"] == events_asked:
                events_asked = None
                if m["answer"] == "Gap":
                    processed = m["oldest"] - 1  # reconcile with QueryTask, then go on
                    ask_events()
            elif kind == "event" and m["seq"] == processed + 1:
                print(json.dumps(m), flush=True)
                processed = m["seq"]
                since_ack += 1
                if m["event"] == "task_done" and m["task_id"] == task_id:
                    done = m
            elif kind == "event" and m["seq"] > processed + 1 and events_asked is None:
                ask_events()  # one is missing: ask from the last processed
        if events_asked is None and (since_ack >= 100 or time.monotonic() - last_ack >= 10):
            ask_events()
            since_ack, last_ack = 0, time.monotonic()
    if events_asked is None:
        ask_events()  # acknowledge what was processed
    time.sleep(0.2)
    b.client.loop_stop()
    b.client.disconnect()
    print(json.dumps({"processed": processed, "done": done is not None}), flush=True)
    return 0 if done is not None else 1


if __name__ == "__main__":
    sys.exit(main())
