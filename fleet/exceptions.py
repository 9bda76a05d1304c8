"""Every error the fleet side raises, all :class:`~edgepack.agent.exceptions.EdgepackError`::

    EdgepackError (edgepack.agent.exceptions)
    └── FleetError             the operator's side could not do what was asked
        ├── BrokerError        the MQTT broker is unreachable or refused us
        ├── BundleLookupError  the bundles for a deploy cannot be found or read
        ├── StoreError         the collector's store cannot be opened, read or written
        ├── JobError           no such job, or it cannot be canceled (finished, expired, ...)
        ├── RolloutError       a staged rollout cannot be started or driven as asked
        │   └── LeaseHeldError another controller drives that rollout (who, until when)
        └── PolicyError        a policy file is not valid, or a policy action cannot be decided

Command signing errors are the agent's (:mod:`edgepack.formats.messages`,
:mod:`edgepack.formats.modelsig`), since the device checks the same format.
"""

from __future__ import annotations

from edgepack.formats.exceptions import EdgepackError

__all__ = [
    "BrokerError",
    "BundleLookupError",
    "FleetError",
    "JobError",
    "LeaseHeldError",
    "PolicyError",
    "RolloutError",
    "StoreError",
]


class FleetError(EdgepackError):
    """The fleet side could not do what was asked; the message says what to do."""


class BrokerError(FleetError):
    """The MQTT broker is unreachable, refused the connection, or did not acknowledge."""


class BundleLookupError(FleetError):
    """A deploy's bundles cannot be found (no bundle for the version, server down, bad index)."""


class StoreError(FleetError):
    """The collector's store (SQLite or PostgreSQL) cannot be opened, read or written."""


class JobError(FleetError):
    """A job id the store does not know, or a job that cannot be canceled (already canceled,
    finished on every device, or expired); the message says which and what to do."""


class RolloutError(FleetError):
    """A staged rollout cannot be started or driven: a bad stage or condition, no devices, an
    unknown rollout id, or a rollout another controller moved on meanwhile."""


class LeaseHeldError(RolloutError):
    """Another controller holds the rollout's lease; the message names it and its expiry."""


class PolicyError(FleetError):
    """A policy file that is not valid (the message names the line and what to write), a rule
    that cannot act as configured, or a policy action that is unknown or already decided."""
