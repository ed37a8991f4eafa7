"""awm server start|stop|status: the local Prefect server and the project's process worker."""
from __future__ import annotations

from flows.commands import group, seconds


def register(sub) -> None:
    actions = group(sub, "server", "local Prefect server (UI + API) and the process worker that runs deployments")
    start = actions.add_parser(
        "start", help="start the Prefect server and a process worker in the background",
        description="Start `prefect server start` (state in AWM_HOME/prefect, analytics off) and "
                    "`prefect worker start` for the work pool server.work_pool (created when missing), "
                    "detached, with pid files and logs in AWM_HOME/server. Waits until the API answers.")
    start.add_argument("--no-worker", action="store_true", help="start only the server")
    start.add_argument("--timeout", type=seconds, default=120.0, help="seconds to wait for the API (default 120)")
    start.set_defaults(func=run_start)

    stop = actions.add_parser(
        "stop", help="stop the worker and the server (SIGINT, then SIGTERM, then SIGKILL)",
        description="Stop the worker, then the server: SIGINT to each process group, then SIGTERM and "
                    "SIGKILL after --timeout seconds each; flow runs the worker started are stopped too.")
    stop.add_argument("--timeout", type=seconds, default=15.0, help="seconds to wait after each signal (default 15)")
    stop.set_defaults(func=run_stop)

    st = actions.add_parser("status", help="show whether the server and worker run, and where their logs are")
    st.set_defaults(func=run_status)


def run_start(args) -> int:
    from awm_core.settings import get_settings
    from flows import server

    settings = get_settings()
    print(f"starting Prefect server on {server.ui_url(settings)} (state in {settings.prefect_home}) ...", flush=True)
    st = server.start(settings, timeout=args.timeout, worker=not args.no_worker)
    print(st.render())
    print("\nOpen the UI at " + st.ui_url)
    print("Point Prefect commands at this server with:")
    for key, value in server.exports(settings).items():
        print(f"  export {key}={value}")
    return 0


def run_stop(args) -> int:
    from awm_core.settings import get_settings
    from flows import server

    stopped = server.stop(get_settings(), timeout=args.timeout)
    for role, was_running in stopped.items():
        print(f"{role}: {'stopped' if was_running else 'was not running'}")
    return 0


def run_status(args) -> int:
    from awm_core.settings import get_settings
    from flows import server

    st = server.status(get_settings())
    print(st.render())
    return 0 if st.running else 3
