#!/usr/bin/env python3
"""Drives the gateway's MQTT endpoint with paho-mqtt (2.x), an MQTT client independent of the
gateway's own code, for tests/tests/mqtt_clients.rs.

Reads a JSON list of steps from stdin and prints one JSON object per step (a JSON list in all) on
stdout. It decides nothing: it reports what paho saw, and the Rust test asserts on it.

A step:
  {"kind": "connect" | "subscribe" | "publish",
   "port": 1883, "version": 4 | 5, "client_id": "...", "username": "..." | null,
   "password": "..." | null,
   "filters": [["topic", qos], ...]                      (subscribe)
   "topic": "...", "qos": 0..2, "retain": bool, "payload_hex": "..."   (publish)
   "then_subscribe": "topic" | null                      (publish: a SUBSCRIBE after it, to show
                                                          whether the connection still serves)}

A result:
  {"connack": int | null,        the CONNACK code (3.1.1 return code or 5.0 reason code)
   "session_present": bool | null,
   "granted": [int] | null,      the SUBACK codes (3.1.1 0x80 failure; 5.0 reason codes)
   "puback": int | null,         the PUBACK reason (5.0; 0 for 3.1.1's PUBACK)
   "disconnect": int | null,     the reason of a DISCONNECT sent by the server (5.0)
   "closed": bool,               the connection ended without the client ending it
   "then_granted": [int] | null} the SUBACK of "then_subscribe", if the connection still served
"""

import json
import sys
import time
import warnings

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

HOST = "127.0.0.1"
# Every wait is bounded: no step can hang the test.
STEP_TIMEOUT = 5.0

# The 3.1.1 return code is read with paho's VERSION1 callbacks, which pass it as sent; VERSION2
# turns it into a 5.0-style reason code.
warnings.simplefilter("ignore", DeprecationWarning)


class Probe:
    def __init__(self, step):
        self.step = step
        self.version = step["version"]
        self.result = {
            "connack": None,
            "session_present": None,
            "granted": None,
            "puback": None,
            "disconnect": None,
            "closed": False,
            "then_granted": None,
        }
        self.subacks = {}
        self.pubacks = {}
        self.closing = False
        v311 = self.version == 4
        api = CallbackAPIVersion.VERSION1 if v311 else CallbackAPIVersion.VERSION2
        kwargs = {"callback_api_version": api, "client_id": step["client_id"]}
        if v311:
            kwargs["protocol"] = mqtt.MQTTv311
            kwargs["clean_session"] = True
        else:
            kwargs["protocol"] = mqtt.MQTTv5
        self.client = mqtt.Client(**kwargs)
        if step.get("username") is not None:
            self.client.username_pw_set(step["username"], step.get("password"))
        self.client.on_connect = self.on_connect
        self.client.on_subscribe = self.on_subscribe
        self.client.on_publish = self.on_publish
        self.client.on_disconnect = self.on_disconnect

    # -- callbacks (VERSION1 for 3.1.1, VERSION2 for 5.0)

    def on_connect(self, client, userdata, flags, rc, properties=None):
        if self.version == 4:
            self.result["connack"] = int(rc)
            self.result["session_present"] = bool(flags.get("session present"))
        else:
            self.result["connack"] = rc.value
            self.result["session_present"] = bool(flags.session_present)

    def on_subscribe(self, client, userdata, mid, granted, properties=None):
        if self.version == 4:
            self.subacks[mid] = [int(q) for q in granted]
        else:
            self.subacks[mid] = [code.value for code in granted]

    def on_publish(self, client, userdata, mid, reason=None, properties=None):
        self.pubacks[mid] = reason.value if reason is not None and self.version == 5 else 0

    def on_disconnect(self, client, userdata, *args):
        # VERSION1 3.1.1: (rc); VERSION2: (flags, reason, properties).
        if self.version == 5:
            flags, reason = args[0], args[1]
            if flags.is_disconnect_packet_from_server and self.result["disconnect"] is None:
                self.result["disconnect"] = reason.value
        if not self.closing:
            self.result["closed"] = True

    # -- the network loop, driven by hand and bounded

    def pump(self, until, timeout=STEP_TIMEOUT):
        deadline = time.monotonic() + timeout
        while not until() and time.monotonic() < deadline:
            rc = self.client.loop(timeout=0.05)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                # A refused CONNACK, or the connection ended.
                if self.result["connack"] == 0:
                    self.result["closed"] = True
                break
        return until()

    def connect(self):
        self.client.connect(HOST, self.step["port"], keepalive=30)
        self.pump(lambda: self.result["connack"] is not None)
        return self.result["connack"] == 0

    def subscribe(self, filters):
        rc, mid = self.client.subscribe([(topic, qos) for topic, qos in filters])
        if rc != mqtt.MQTT_ERR_SUCCESS:
            return None
        self.pump(lambda: mid in self.subacks or self.result["closed"])
        return self.subacks.get(mid)

    def publish(self):
        step = self.step
        info = self.client.publish(
            step["topic"], bytes.fromhex(step.get("payload_hex", "")), qos=step["qos"], retain=step.get("retain", False)
        )
        mid = info.mid
        # Waits for the PUBACK, or for the server to close; a QoS 0 publish gets neither, so the
        # wait ends at a short quiet time.
        timeout = STEP_TIMEOUT if step["qos"] > 0 else 1.0
        self.pump(lambda: mid in self.pubacks or self.result["closed"], timeout)
        if step["qos"] > 0:
            self.result["puback"] = self.pubacks.get(mid)
        if not self.result["closed"] and step.get("then_subscribe"):
            self.result["then_granted"] = self.subscribe([(step["then_subscribe"], 1)])
        # Give a close that follows the PUBACK or the DISCONNECT a moment to show.
        self.pump(lambda: self.result["closed"], 0.3)

    def close(self):
        self.closing = True
        try:
            self.client.disconnect()
            self.client.loop(timeout=0.05)
        except Exception:
            pass


def run(step):
    probe = Probe(step)
    try:
        if probe.connect():
            if step["kind"] == "subscribe":
                probe.result["granted"] = probe.subscribe(step["filters"])
            elif step["kind"] == "publish":
                probe.publish()
    except OSError as e:
        probe.result["error"] = str(e)
    finally:
        probe.close()
    return probe.result


def main():
    steps = json.load(sys.stdin)
    print(json.dumps([run(step) for step in steps]))


if __name__ == "__main__":
    main()
