"""The agent itself: lifecycle + runtime + HTTP server, usable in-process or as the daemon.

:class:`Agent` is the Python API for applications that embed edgepack::

    with Agent(load_config(Path("agent.toml"))).start(serve_http=False) as agent:
        agent.install("churn-7-arm64-cpu.edgepack")
        agent.infer("churn", {"input": rows})

``start`` first finishes or undoes any operation a crash interrupted (the journal), then loads
the active version of every installed model, starts the HTTP server if asked, and watches
``state.json`` so an install made by another process (``edgepack-agent install`` while the
daemon runs) is picked up and hot-swapped within a second. An install, rollback or recovery run
here instead swaps in the session its health check ran on (edgepack.agent._health_check), so the
model is loaded once; the watcher leaves that swap to it.

Everything is wired here, at construction, from the one :class:`AgentConfig`: the lifecycle, the
monitor (telemetry and drift, with the sample store when ``[capture]`` is on), and the runtime
that reports every request to it. The monitor's reports go to :attr:`Agent.reports`, a relay the
MQTT link (edgepack.agent._fleet_link), built afterwards, connects to its outbox.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edgepack._files import read_json
from edgepack.agent._capture import SampleStore
from edgepack.agent._config import AgentConfig
from edgepack.agent._experiment import ExperimentConfig, Experiments, Plan
from edgepack.agent._http_server import InferenceServer
from edgepack.agent._lifecycle import Fetcher, Lifecycle, OnState, Outcome
from edgepack.agent._monitor import Monitor, ReportRelay
from edgepack.agent._prometheus import gauge
from edgepack.agent._runtime import Runtime, ServedModel
from edgepack.agent._supervise import Heartbeats, SupervisedThread
from edgepack.agent._trust import TrustStore
from edgepack.agent.exceptions import EdgepackError

if TYPE_CHECKING:  # grpc is loaded only when [grpc] is enabled
    from edgepack.agent._grpc_server import GrpcInferenceServer

__all__ = ["Agent"]

log = logging.getLogger("edgepack.agent")


class Agent:
    """One device's agent.

    Args:
        config: the agent configuration.
        fetcher: how bundles are fetched (local paths by default).
        poll_interval: how often to look for installs made by another process, in seconds.
        experiments: bounds of experiments' shadow work (queue, CPU share); default: the
            config's ``[experiments]``.
    """

    def __init__(
        self,
        config: AgentConfig,
        fetcher: Fetcher | None = None,
        poll_interval: float = 1.0,
        experiments: ExperimentConfig | None = None,
    ) -> None:
        self.config = config
        self.trust = TrustStore(config)
        self.lifecycle = Lifecycle(config, fetcher=fetcher, bundle_keys=self.trust.bundle_keys)
        capture = config.capture
        self.samples = (
            SampleStore(config.state_dir / "samples.db", capture) if capture.enabled else None
        )
        self.reports = ReportRelay()  # telemetry and drift reports; the MQTT link connects it
        # candidates beside active versions (edgepack.agent._experiment): routed by the
        # runtime, reported by the monitor
        bounds = config.experiments
        self.experiments = Experiments(
            experiments
            or ExperimentConfig(queue=bounds.shadow_queue, cpu_share=bounds.shadow_cpu_share)
        )
        self.monitor = Monitor(
            self.lifecycle.store,
            config.monitor,
            sink=self.reports,
            capture=self.samples,
            quality=config.quality,
            experiments=self.experiments,
        )
        self.runtime = Runtime(
            config.runtime,
            config.server.max_batch_rows,
            monitor=self.monitor,
            experiments=self.experiments,
            on_crash=self.thread_crashed,
        )
        self.server: InferenceServer | None = None
        self.grpc_server: GrpcInferenceServer | None = None
        # proof of life from the parts that must stay responsive (systemd's watchdog reads it)
        self.heartbeats = Heartbeats()
        self._poll_interval = poll_interval
        self._stop = threading.Event()
        self._watcher: SupervisedThread | None = None
        self._ready = False
        # held by an install, rollback or retire in this process, which swaps in the session
        # its health check loaded; the watcher does not load that version a second time
        self._operating = threading.Lock()
        self.recovered: Outcome | None = None

    # -- running -------------------------------------------------------------------------------

    def start(self, serve_http: bool | None = None) -> Agent:
        """Recover, load installed models, and (by default per config) serve HTTP."""
        self.lifecycle.store.ensure()
        self.recovered = self.lifecycle.recover()
        if self.recovered is not None:
            log.warning("recovered an interrupted %s: %s", self.recovered.op, self.recovered.result)
            self._hand_over(self.recovered)
        for outcome in self.lifecycle.start_probation_check():  # a version that keeps us dying
            log.warning("probation: %s: %s (%s)", outcome.op, outcome.result, outcome.reason)
            self._apply(outcome)
        self.sync()
        if serve_http if serve_http is not None else self.config.server.enabled:
            self.server = InferenceServer(
                self.runtime,
                self.config.server.host,
                self.config.server.port,
                self.config.server.max_request_bytes,
                ready=lambda: self._ready,
                metrics=self.metrics,
                max_connections=self.config.server.max_connections,
                workers=self.config.server.workers,
                request_timeout=self.config.server.read_timeout,
                idle_timeout=self.config.server.idle_timeout,
            ).start()
            log.info("serving the Open Inference Protocol on %s", self.server.url)
        if self.config.grpc.enabled:
            self._serve_grpc()
        self.monitor.start()
        self._watcher = SupervisedThread(
            "edgepack-watch", self._watch, on_crash=self.thread_crashed
        ).start()
        self._ready = True
        return self

    def stop(self) -> None:
        """Stop serving and watching (installed models stay installed)."""
        self._ready = False
        if self._watcher is not None:
            self._watcher.stop_event.set()
        self._stop.set()
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.grpc_server is not None:
            self.grpc_server.stop()
            self.grpc_server = None
        if self._watcher is not None:
            self._watcher.stop(timeout=5)
        self.experiments.stop_all()
        self.monitor.stop()

    def _serve_grpc(self) -> None:
        """Start the gRPC server ([grpc], the ``grpc`` extra); on failure stop HTTP too."""
        from edgepack.agent._grpc_server import GrpcInferenceServer

        try:
            server = GrpcInferenceServer(self.runtime, self.config.grpc, ready=lambda: self._ready)
        except EdgepackError:
            if self.server is not None:
                self.server.stop()
                self.server = None
            raise
        self.grpc_server = server.start()
        log.info("serving the Open Inference Protocol over gRPC on %s", server.address)

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def sync(self) -> list[str]:
        """Serve exactly the committed active versions."""
        store = self.lifecycle.store
        return self.runtime.sync(store, store.load(), self.trust.bundle_keys())

    def thread_crashed(self, name: str, error: str, trace: str) -> None:
        """A supervised worker died and is being restarted: count it and report it."""
        self.monitor.telemetry.event(f"thread-crash:{name}")

    def _watch(self, stop: threading.Event) -> None:
        state_file = self.lifecycle.store.state_file
        while not self._stop.wait(self._poll_interval):
            try:
                data = read_json(state_file)
                changed = data is not None and data.get("generation") != self.runtime.generation
                if changed and self._operating.acquire(blocking=False):
                    try:  # (else an operation here is about to swap in its own session)
                        self.sync()
                    finally:
                        self._operating.release()
                self.lifecycle.settle()  # versions that served out their probation: good
            except EdgepackError as e:
                log.error("cannot load the installed models: %s", e)

    # -- lifecycle -----------------------------------------------------------------------------

    def metrics(self) -> str:
        """Prometheus text for ``/metrics``."""
        # 0 ok, 1 warning, 2 drift: one gauge per model, from its latest window
        levels = {"ok": 0, "warning": 1, "drift": 2}
        drift = gauge(
            "edgepack_drift_status",
            "Verdict of the latest drift window: 0 ok, 1 warning, 2 drift.",
            (
                (
                    {"model": name, "version": str(report["version"])},
                    levels.get(report["status"], 0),
                )
                for name, report in sorted(self.monitor.latest.items())
            ),
        )
        return self.monitor.telemetry.prometheus([drift, *self.monitor.quality_families()])

    def _hand_over(self, outcome: Outcome) -> None:
        """Serve the session the operation's health check ran on: the model is loaded once
        (a candidate's goes into its experiment)."""
        if outcome.session is not None and outcome.manifest is not None:
            served = ServedModel(outcome.manifest, outcome.session)
            if outcome.op == "candidate":
                self._run_candidate(served)
            else:
                self.runtime.activate(served)
        outcome.session = None  # the runtime holds it now; an outcome kept must not

    def _run_candidate(self, served: ServedModel) -> None:
        model = self.lifecycle.store.load().models.get(served.name)
        active = self.runtime.models_by_name().get(served.name)
        if model is None or model.candidate is None or active is None:
            return  # sync() loads what state.json says
        if model.candidate_version == served.version:
            self.runtime.start_experiment(
                served, Plan.from_json(model.candidate["plan"]), active.version
            )

    def _apply(self, outcome: Outcome) -> Outcome:
        self.monitor.telemetry.event(f"{outcome.op}:{outcome.result}")
        self._hand_over(outcome)
        self.sync()  # loads whatever else was committed; requests in flight finish
        return outcome

    def _operate(self, operation: Callable[[], Outcome]) -> Outcome:
        with self._operating:
            return self._apply(operation())

    def install(
        self,
        source: str,
        *,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
        model: str | None = None,
        version: int | None = None,
        job_id: str | None = None,
        on_state: OnState | None = None,
    ) -> Outcome:
        """Install a bundle (see :meth:`edgepack.agent._lifecycle.Lifecycle.install`), serve it.

        ``on_state`` is called with the journal entry of every state entered (job progress).
        """
        return self._operate(
            lambda: self.lifecycle.install(
                source,
                expected_sha256=expected_sha256,
                expected_size=expected_size,
                model=model,
                version=version,
                job_id=job_id,
                on_state=on_state,
            )
        )

    def rollback(
        self, name: str, *, job_id: str | None = None, on_state: OnState | None = None
    ) -> Outcome:
        """Go back to the retained previous version of ``name`` and serve it."""
        return self._operate(
            lambda: self.lifecycle.rollback(name, job_id=job_id, on_state=on_state)
        )

    def retire(
        self, name: str, *, job_id: str | None = None, on_state: OnState | None = None
    ) -> Outcome:
        """Uninstall ``name`` and stop serving it."""
        return self._operate(lambda: self.lifecycle.retire(name, job_id=job_id, on_state=on_state))

    def start_experiment(
        self,
        source: str,
        *,
        plan: dict[str, Any],
        expected_sha256: str | None = None,
        expected_size: int | None = None,
        model: str | None = None,
        version: int | None = None,
        job_id: str | None = None,
        on_state: OnState | None = None,
    ) -> Outcome:
        """Install a bundle as the candidate of an experiment (``plan``: ``{"mode": "shadow",
        "sample": 0.2}`` or ``{"mode": "split", "share": 0.1}``) beside the active version and
        run it (see :meth:`edgepack.agent._lifecycle.Lifecycle.install_candidate`)."""
        return self._operate(
            lambda: self.lifecycle.install_candidate(
                source,
                plan=plan,
                expected_sha256=expected_sha256,
                expected_size=expected_size,
                model=model,
                version=version,
                job_id=job_id,
                on_state=on_state,
            )
        )

    def promote(
        self,
        name: str,
        version: int | None = None,
        *,
        job_id: str | None = None,
        on_state: OnState | None = None,
    ) -> Outcome:
        """Make the candidate of ``name`` its active version (health-checked, journaled; the
        active version is retained for a rollback) and serve it."""
        return self._operate(
            lambda: self.lifecycle.promote(name, version, job_id=job_id, on_state=on_state)
        )

    def stop_experiment(
        self, name: str, *, job_id: str | None = None, on_state: OnState | None = None
    ) -> Outcome:
        """End the experiment of ``name``: its candidate is removed."""
        return self._operate(
            lambda: self.lifecycle.stop_experiment(name, job_id=job_id, on_state=on_state)
        )

    # -- inference and status -------------------------------------------------------------------

    def infer(
        self,
        name: str,
        inputs: Mapping[str, Any],
        version: int | None = None,
        outputs: Sequence[str] | None = None,
        request_id: str | None = None,
        caller: str | None = None,
    ) -> dict[str, np.ndarray]:
        """Run inference in-process (same validation as the HTTP endpoint).

        With a ``request_id`` the predictions are kept for :meth:`feedback` (``[quality]``).
        ``caller`` keeps a caller on one variant of a split experiment.

        Raises:
            ModelNotFoundError: no such model or version is served.
            RequestError: bad inputs or unknown outputs.
            InferenceError: the model failed on valid inputs.
        """
        if request_id is None and caller is None:
            return self.runtime.infer(name, inputs, version, outputs)
        served = self.runtime.route(name, version, caller)
        result = self.runtime.run(served, inputs, outputs)
        self.runtime.remember(served, request_id, result)
        return result

    def feedback(
        self, name: str, request_id: str, labels: Any = None, targets: Any = None
    ) -> dict[str, Any]:
        """The ground truth of an earlier request (one label or target per row it had).

        Returns ``{"id", "rows", "accepted"}`` (``accepted`` false: a repeat, ignored).

        Raises:
            UnknownRequestError: no predictions kept for ``request_id`` (HTTP 404).
            FeedbackError: malformed feedback (HTTP 400).
        """
        return self.monitor.feedback(name, request_id, labels=labels, targets=targets)

    def status(self) -> dict[str, Any]:
        """Installed and served models, any pending operation, and recent events."""
        state = self.lifecycle.store.load()
        served = {m.name: m.version for m in self.runtime.models()}
        failed = self.runtime.failed
        pending = self.lifecycle.journal.read()
        return {
            "device_id": self.config.device_id,
            "profile": self.config.profile,
            "models": {
                name: {
                    "active": m.active,
                    "previous": m.previous,
                    "highest": m.highest,
                    "serving": served.get(name),
                    "not_served_because": failed.get(name, (None, None))[1],
                    "drift": self.monitor.verdict(name, m.active),
                    "quality": self.monitor.quality_verdict(name, m.active),
                    "installed_at": m.installed_at,
                    "candidate": None
                    if m.candidate is None
                    else {
                        "version": m.candidate_version,
                        **m.candidate["plan"],
                        "running": self.experiments.get(name) is not None,
                    },
                }
                for name, m in sorted(state.models.items())
            },
            "pending": None
            if pending is None
            else {"op": pending.op, "state": pending.state, "model": pending.model},
            "history": state.history[-10:],
        }
