"""Stage 7, the render farm: jobs spread over Ray actors, one per GPU, across machines (docs/farm.md).

Owns: joining or starting a Ray cluster (`cluster.py`), the actor holding a warm Pipeline
(`actor.py`, serve's `TaskRunner` inside a Ray worker), serve's `Executor` over those actors
(`executor.py`, what `serve --backend ray` uses), the batch file and the markers of finished jobs
(`jobs.py`) and the `farm run` loop (`batch.py`).

Ray is the `farm` extra (`pip install 'liveavatar-lite[farm]'`) and is imported only inside
functions, so this package loads without it and says how to install it when it is needed.

May import: `serve/` and every stage below it. `serve/` never imports this: `commands/` hands
serve a `RayExecutor` when asked for `--backend ray`.
"""
