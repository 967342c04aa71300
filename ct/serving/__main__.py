"""Run the prediction service on a workspace's champion:

    python -m ct.serving --workspace WS [--host 127.0.0.1] [--port 8500]

--workspace defaults to CT_WORKSPACE, --port to CT_SERVE_PORT (else 8500). The model is the one
WS/serving/wanted.json names; until there is one, /healthz answers 503. uvicorn uses uvloop and
httptools when they are installed, its pure-Python loop and parser otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ct.serving import settings as settings_module


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ct.serving",
                                     description="Serve the champion's predictions over HTTP.")
    parser.add_argument("--workspace", type=Path, default=os.environ.get("CT_WORKSPACE") or None,
                        help="the workspace (default: $CT_WORKSPACE)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=None,
                        help="port (default: $CT_SERVE_PORT, else 8500)")
    args = parser.parse_args(argv)
    if args.workspace is None:
        return fail("--workspace is required (or set CT_WORKSPACE)")
    text = str(args.port) if args.port is not None else os.environ.get("CT_SERVE_PORT", "8500")
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        return fail(f"port {text!r} is not a port number (--port, CT_SERVE_PORT)")
    port = int(text)
    try:
        settings = settings_module.from_environment()
    except settings_module.SettingError as exc:
        return fail(str(exc))

    from ct.serving.app import create_app, workspace_problem

    problem = workspace_problem(args.workspace)
    if problem:
        return fail(problem)
    app, _ = create_app(args.workspace.resolve(), settings)

    import uvicorn

    print(f"ct.serving: serving {args.workspace} on http://{args.host}:{port}", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=args.host, port=port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5, server_header=False)
    return 0


def fail(reason: str) -> int:
    """Bad input: one line on stderr, exit 2."""
    print(f"ct.serving: error: {reason}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
