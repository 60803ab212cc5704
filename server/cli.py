"""The ``channelscope`` command: ``serve`` the service, or run the ``demo``."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Sequence

import httpx
import redis
import uvicorn

from monitor_agent.endpoint import resolve_redis_url
from server.app import create_app
from server.auth import ROLES, create_token, list_tokens, revoke_token
from server.settings import Settings


def _server(settings: Settings) -> uvicorn.Server:
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning")
    return uvicorn.Server(config)


def _announce(settings: Settings, redis_url: str) -> None:
    where = f"http://{settings.host}:{settings.port}/"
    print(f"channelscope dashboard: {where}", flush=True)
    print(f"  API docs:  {where}docs", flush=True)
    print(f"  Redis:     {redis_url}", flush=True)
    if settings.redis_url is None:
        print(
            "  embedded Redis on 127.0.0.1; agents on this machine connect automatically",
            flush=True,
        )


def _start(settings: Settings) -> tuple[uvicorn.Server, threading.Thread, Settings, str]:
    """Start the server on a thread; return it, the settings with the port it bound (port 0
    picks a free one) and the Redis URL it uses."""
    server = _server(settings)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    port, redis_url = _wait_ready(server, thread, settings)
    return server, thread, settings.model_copy(update={"port": port}), redis_url


def serve(settings: Settings) -> int:
    """Run the server in the foreground until interrupted."""
    server, thread, settings, url = _start(settings)
    _announce(settings, url)
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        server.should_exit = True
        thread.join(15)
    return 0


def _wait_ready(
    server: uvicorn.Server, thread: threading.Thread, settings: Settings, timeout: float = 60.0
) -> tuple[int, str]:
    """The bound port and the Redis URL, once the server answers its health check."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not thread.is_alive():
            # uvicorn logs the cause (most often the address in use) and returns.
            raise SystemExit(
                f"channelscope: the server could not start on {settings.host}:{settings.port} "
                "(is the port in use? --port picks another, --port 0 a free one)"
            )
        if server.started:
            port = int(server.servers[0].sockets[0].getsockname()[1])
            try:
                httpx.get(f"http://{settings.host}:{port}/healthz", timeout=1.0)
                app = server.config.loaded_app
                while hasattr(app, "app"):
                    app = app.app
                return port, str(app.state.redis_url)
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    raise SystemExit(f"channelscope: the server did not answer within {timeout:.0f} s")


def demo(settings: Settings, steps: int, runs: int, keep_serving: bool) -> int:
    """Serve, then train the grokking demo with the agent attached."""
    import monitor_agent
    from monitor_agent.demo import train

    server, thread, settings, redis_url = _start(settings)
    _announce(settings, redis_url)
    try:
        for i in range(runs):
            wd = 1.0 if i % 2 == 0 else 0.3
            cfg = {
                "task": "modular addition",
                "p": 53,
                "weight_decay": wd,
                "lr": 3e-3,
                "seed": i,
                "steps": steps,
            }
            with monitor_agent.init(
                "demo", f"grokking-wd{wd}-seed{i}", config=cfg, redis_url=redis_url
            ) as run:
                print(
                    f"demo run {run.id}: http://{settings.host}:{settings.port}/runs/{run.id}",
                    flush=True,
                )
                final = train(run, steps=steps, weight_decay=wd, seed=i)
                print(f"  finished: {final}", flush=True)
        if keep_serving:
            print("demo finished; the dashboard keeps serving (Ctrl-C to stop)", flush=True)
            while thread.is_alive():
                thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        thread.join(15)
    return 0


def _redis_for_cli(settings: Settings) -> redis.Redis:
    url = resolve_redis_url(settings.redis_url)
    if url is None:
        raise SystemExit(
            "channelscope: no Redis: set CHANNELSCOPE_REDIS_URL or start `channelscope serve`"
        )
    return redis.Redis.from_url(url)


def token_command(settings: Settings, args: argparse.Namespace) -> int:
    """``token create|list|revoke``: manage API tokens directly in Redis."""
    client = _redis_for_cli(settings)
    try:
        if args.token_command == "create":
            token, token_id = create_token(
                client, settings.prefix, args.role, args.project, args.name
            )
            print(f"token {token_id} ({args.role} on project {args.project!r}); shown once:")
            print(token)
        elif args.token_command == "list":
            for rec in list_tokens(client, settings.prefix):
                print(f"{rec['id']}  {rec['role']:5s}  {rec['project']}  {rec.get('name', '')}")
        elif not revoke_token(client, settings.prefix, args.id):
            print(f"no token {args.id!r}", file=sys.stderr)
            return 1
        else:
            print(f"revoked {args.id}")
    finally:
        client.close()
    return 0


def sync_command(settings: Settings, paths: list[str]) -> int:
    """``sync PATH…``: upload spool files (a file, or a folder of ``*.spool``)."""
    from pathlib import Path

    from monitor_agent.sender import sync_spool

    url = resolve_redis_url(settings.redis_url)
    if url is None:
        raise SystemExit(
            "channelscope: no Redis: set CHANNELSCOPE_REDIS_URL or start `channelscope serve`"
        )
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(p.glob("*.spool")) if p.is_dir() else [p])
    failed = 0
    for f in files:
        try:
            res = sync_spool(f, url)
        except (OSError, redis.RedisError) as exc:
            print(f"{f}: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{f.name}: {res['ops']} ops sent, {res['already_there']} already there, "
              f"{res['errors']} errors")  # fmt: skip
        failed += bool(res["errors"])
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``channelscope`` console script."""
    parser = argparse.ArgumentParser(prog="channelscope")
    sub = parser.add_subparsers(dest="command", required=True)
    p_sync = sub.add_parser("sync", help="upload agent spool files written while offline")
    p_sync.add_argument(
        "paths", nargs="+", help="spool files or folders (default spool: ~/.channelscope/spool)"
    )
    p_token = sub.add_parser("token", help="create, list or revoke API tokens")
    tsub = p_token.add_subparsers(dest="token_command", required=True)
    t_create = tsub.add_parser("create")
    t_create.add_argument("--project", default="*", help="project name, or * for all")
    t_create.add_argument("--role", choices=ROLES, default="read")
    t_create.add_argument("--name", default="")
    tsub.add_parser("list")
    t_revoke = tsub.add_parser("revoke")
    t_revoke.add_argument("id", help="the token id printed by create or list")
    p_serve = sub.add_parser("serve", help="run the server and dashboard")
    p_demo = sub.add_parser("demo", help="serve and train a grokking demo run")
    for p in (p_serve, p_demo):
        p.add_argument("--host", default=None)
        p.add_argument("--port", type=int, default=None)
    p_demo.add_argument("--steps", type=int, default=4000)
    p_demo.add_argument("--runs", type=int, default=1)
    p_demo.add_argument("--exit", action="store_true", help="stop serving when training ends")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "token":
        return token_command(Settings(), args)
    if args.command == "sync":
        return sync_command(Settings(), args.paths)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = Settings(**overrides)
    if args.command == "serve":
        return serve(settings)
    return demo(settings, args.steps, args.runs, keep_serving=not args.exit)


if __name__ == "__main__":
    sys.exit(main())
