"""Serving a policy over openpi's websocket protocol: wire format, validation, server and client.

``torch`` is needed only by the server side; robot code needs ``damvla.serving.client`` and
``damvla.serving.protocol`` (numpy, msgpack, websockets), so nothing heavy is imported here.
"""
