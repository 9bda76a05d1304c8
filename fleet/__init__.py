"""edgepack fleet: the operator's side (MQTT fleet commands, the collector, reports).

Arrives with the fleet issue; it imports the shared formats from :mod:`agent`.
"""
