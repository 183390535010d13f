"""Running the app under uvicorn with a graceful drain on SIGTERM / SIGINT (`gq serve --engine hf`).

On the first signal the server keeps listening but takes no new work: generation requests and
/health answer 503 (with Retry-After, so a load balancer moves on), the engine finishes what is
queued and running, the last responses are sent, then uvicorn stops and the process exits 0.
Everything is bounded: after ``drain_timeout`` seconds the remaining requests are cancelled
(their streams end), and uvicorn gets ``GRACEFUL_CLOSE_S`` more to close connections. A second
signal stops at once.
"""
from __future__ import annotations

import logging
import threading
import time

import uvicorn

log = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT_S = 25.0  # below Kubernetes' default 30 s termination grace period
GRACEFUL_CLOSE_S = 3.0


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose exit signal drains the engine first (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, engine, app_state, drain_timeout: float) -> None:
        super().__init__(config)
        self.engine, self.app_state, self.drain_timeout = engine, app_state, drain_timeout
        self.drain_started: float | None = None
        self.drained: bool | None = None  # None until the drain ends; False if it timed out

    def handle_exit(self, sig: int, frame) -> None:
        # Not uvicorn's: it re-raises the signal after shutting down, so a drained server would
        # die by SIGTERM instead of exiting 0.
        if self.drain_started is not None:  # a second signal: stop now
            log.warning("second signal: stopping without waiting for %d request(s)", self.engine.in_flight)
            self.should_exit = self.force_exit = True
            return
        self.drain_started = time.monotonic()
        log.info("signal %d: draining %d request(s) (at most %.0f s); new requests get 503",
                 sig, self.engine.in_flight, self.drain_timeout)
        threading.Thread(target=self._drain, name="gq-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = self.drain_started + self.drain_timeout
        done = self.engine.drain(max(0.0, deadline - time.monotonic()))
        # The engine's last token is not the response's last byte: wait for the handlers too
        # (this request-counting includes the 503s answered meanwhile, which end at once).
        while self.app_state.http_in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.drained = done and self.app_state.http_in_flight == 0
        if self.drained:
            log.info("drained in %.1f s", time.monotonic() - self.drain_started)
        else:
            log.warning("drain timeout (%.0f s): cancelling %d request(s)", self.drain_timeout,
                        self.engine.in_flight)
        self.should_exit = True


def run_server(app, engine, host: str, port: int, log_level: str = "info",
               drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S) -> DrainingServer:
    """Serve ``app`` until a signal, drain, shut the engine down; returns the server (for its
    ``drained`` state)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=GRACEFUL_CLOSE_S)
    server = DrainingServer(config, engine, app.state, drain_timeout)
    try:
        server.run()
    finally:
        engine.shutdown()
    return server
