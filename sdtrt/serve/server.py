"""Running the app under uvicorn on this machine, with a drain on SIGTERM / Ctrl-C: stop accepting
(the listening socket closes, /ready turns 503), let in-flight requests finish for up to the drain
deadline, cancel what is left between denoising steps, exit 0."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

import uvicorn

from .app import create_app
from .service import Service

log = logging.getLogger("sdtrt.serve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service
        self.signalled = False

    def handle_exit(self, sig, frame) -> None:
        self.signalled = True
        self.service.drain()  # /ready answers 503 and new requests on open connections get 503 at once
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn's, without re-raising the signal afterwards: a drained server exits 0."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def serve(service: Service, host: str, port: int, log_level: str = "info") -> None:
    """Serve until SIGTERM / SIGINT, then drain. Raises the model's load error, if loading failed."""
    app = create_app(service)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off", access_log=log_level == "debug",
                            timeout_graceful_shutdown=int(max(1, service.settings.drain_seconds)), server_header=False)
    server = DrainingServer(config, service)
    service.on_fatal = lambda e: setattr(server, "should_exit", True)
    service.start()
    try:
        server.run()
    except KeyboardInterrupt:  # a signal uvicorn re-raised after its graceful shutdown
        pass
    finally:
        service.stop(deadline=5)
    if service.load_error is not None:
        raise service.load_error
