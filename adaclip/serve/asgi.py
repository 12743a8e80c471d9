"""`adaclip serve` as an ASGI app factory, for process managers that run several workers (replicas).

The options are `adaclip serve`'s own, read from ADACLIP_SERVE_ARGS (shell words); the process manager
binds the address, so --host, --port and --max-connections are its options there, not ours:

    ADACLIP_SERVE_ARGS='probe.adaclip zs.adaclip --max-batch 32' \\
        uvicorn --factory adaclip.serve.asgi:create_from_env --host 127.0.0.1 --port 8000 --workers 2

    ADACLIP_SERVE_ARGS='probe.adaclip' gunicorn -k uvicorn.workers.UvicornWorker -w 2 \\
        -b 127.0.0.1:8000 'adaclip.serve.asgi:create_from_env()'

Each worker loads the adapters itself. SIGHUP to uvicorn's (or gunicorn's) main process restarts the
workers, which re-reads the adapter files.
"""

from __future__ import annotations

import os
import shlex

ENV = "ADACLIP_SERVE_ARGS"


def create_from_env():
    """The ASGI app for the adapters and options in ADACLIP_SERVE_ARGS; a bad option or file ends the
    worker with one line on stderr and exit code 2, as the command would."""
    from ..cli import serve_plan
    from ..errors import AdaclipError
    from ..ui import log
    from . import build_app

    try:
        plan = serve_plan(shlex.split(os.environ.get(ENV, "")))
        ignored = [o for o in ("--host", "--port", "--max-connections") if o in plan.given]
        if ignored:
            log.warning(f"{ENV}: {', '.join(ignored)} ignored here: the process manager binds the address")
        return build_app(plan.specs, plan.settings, token=plan.token, **plan.load_options)
    except AdaclipError as exc:
        log.error(exc.one_line())
        raise SystemExit(2) from None
