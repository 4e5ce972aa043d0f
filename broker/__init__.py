"""Hosting the farm's MQTT broker: who hosts it, and the embedded broker itself.

* :mod:`broker.choice` — the pure decision: which broker to use, whether to host (time passed in).
* :mod:`broker.advert` — zeroconf adverts ``_netqueues._tcp.local.``: ours, and everyone's.
* :mod:`broker.embedded` — the amqtt broker's lifecycle, bound address and packet-size limit.
* :mod:`broker.host` — :class:`~broker.host.BrokerHost` carries the decisions out;
  :class:`~broker.host.FixedBroker` is the same interface for ``broker.url``.
* :mod:`broker.discover` — finding the farm's broker from outside (the CLI).

Nothing is imported here: importing the package starts nothing and loads neither amqtt nor zeroconf.
"""
