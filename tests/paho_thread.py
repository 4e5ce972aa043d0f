"""Stopping a paho client that ran its own network thread (``loop_start``) without leaving sockets behind."""

from __future__ import annotations

import paho.mqtt.client as mqtt


def stop(client: mqtt.Client) -> None:
    """Disconnect, join the network thread if one runs and close every socket the client holds.

    paho 2.2's ``loop_start`` (and ``loop``) opens a socket pair that ``loop_stop`` leaves open until the client's ``__del__``.
    A test's client sits in a reference cycle (its callbacks are the test helper's methods), so the garbage
    collector frees it later, at any point of any later test, and may finalise the sockets before the client:
    an "unclosed socket" ResourceWarning, an error under ``filterwarnings = error``, blamed on that later test.
    """
    client.disconnect()
    client.loop_stop()  # MQTT_ERR_INVAL, harmless, when no thread was started
    client._reset_sockets()  # paho has no public close; this is what its __del__ calls
