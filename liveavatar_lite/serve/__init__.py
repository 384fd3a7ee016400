"""Stage 6, the kiosk service: `liveavatar-lite serve` renders jobs on demand for days.

Owns: the typed service config (`config.py`), the state directory layout (`layout.py`), inputs
stored by content hash (`blobs.py`), the durable SQLite job queue (`store.py`), the messages
between the queue and whatever renders (`tasks.py`) and that executor's interface
(`executor.py`), the worker side that renders one task on a warm Pipeline (`runner.py`), the
worker process (`worker.py`) and its supervisor (`supervisor.py`), the dispatcher thread joining
queue and executor (`dispatcher.py`), upload validation (`uploads.py`), job operations the API
calls (`service.py`), Prometheus metrics (`metrics.py`), the HTTP API (`api.py`), the server
wiring (`server.py`) and the single page in `static/`.

May import: `pipeline/` and every stage below it. `pipeline/` never imports this.
"""
