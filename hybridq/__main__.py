"""`python -m hybridq` and the `hybridq` script run the CLI, then end the process without the interpreter's object-by-object teardown."""

import os
import sys


def _exit(code: object) -> None:
    """Exit as Python would (threads joined, atexit callbacks run, streams flushed, the same exit status), but leave
    the memory to the OS instead of freeing every module and object (onnx, ONNX Runtime, typer, pydantic, rich):
    0.1-0.2 s of every command."""
    import atexit
    import threading

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        status = 1
    getattr(threading, "_shutdown", lambda: None)()  # what the interpreter does first: join the non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(status)


def run() -> None:
    """The `hybridq` command (the console script and `python -m hybridq`)."""
    try:
        from hybridq.cli import main
    except KeyboardInterrupt:  # Ctrl-C while the CLI is still importing
        sys.exit(130)
    try:
        main()
    except SystemExit as exc:
        _exit(exc.code)
    _exit(0)


if __name__ == "__main__":
    run()
