"""The `proxmo` console script: one entry point, subcommands dispatched lazily.

Each subcommand lives in the module that owns it and is imported only when it
runs (a `proxmo envs check` never imports vLLM). Every target is a function
``main(argv: list[str]) -> int``.
"""

from __future__ import annotations

import importlib
import signal
import sys

# command -> "module:function", or a nested table for two-word commands.
COMMANDS: dict[str, object] = {
    "train": "services.driver_cli:train_main",
    "eval": "services.driver_cli:eval_main",
    "sft": "services.sft:main",
    "serve": "services.serving.cli:main",
    "scale": "services.driver_cli:scale_main",
    "build-model": "services.serving.tiny_model:main",
    "envs": {
        "check": "services.envs.check:main",
        "demos": "services.envs.experts:main",
    },
    "bench": {
        "all": "services.bench.suite:main",
        "advantages": "services.bench.advantages:main",
        "buffer": "services.bench.buffer:main",
        "serving": "services.bench.serving:main",
        "weights": "services.bench.weights:main",
        "envs": "services.bench.envs:main",
        "e2e": "services.bench.e2e:main",
        "curves": "services.bench.curves:main",
        "scaling": "services.bench.scaling:main",
        "soak": "services.bench.soak:main",
        "engine-memory": "services.bench.engine_memory:main",
        "replica-memory": "services.bench.replica_memory:main",
    },
}


def _usage(table: dict[str, object], prefix: str) -> str:
    lines = [f"usage: {prefix} <command> [args]", "", "commands:"]
    for name, target in table.items():
        if isinstance(target, dict):
            lines.append(f"  {name} {{{', '.join(target)}}}")
        else:
            lines.append(f"  {name}")
    return "\n".join(lines)


def _resolve(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def exit_cleanly_on_sigterm() -> None:
    """Make SIGTERM (``kill``, ``pkill``, Kubernetes stopping a pod) exit like Ctrl-C does.

    Python's default for SIGTERM ends the process at once: no ``finally``, no
    ``atexit``, so an embedded redis-server and the Ray processes of the run were
    left running. Raising SystemExit instead runs the same shutdown path as a
    normal exit. A handler someone else installed is kept.
    """
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def _raise(signum, _frame):
        raise SystemExit(128 + signum)

    try:
        signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not the main thread (an embedding application): leave signals to it
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    exit_cleanly_on_sigterm()
    table: dict[str, object] = COMMANDS
    prefix = "proxmo"
    while True:
        if not argv or argv[0] in ("-h", "--help"):
            print(_usage(table, prefix))
            return 0 if argv else 2
        name = argv.pop(0)
        target = table.get(name)
        if target is None:
            print(f"{prefix}: unknown command {name!r}\n\n{_usage(table, prefix)}", file=sys.stderr)
            return 2
        if isinstance(target, dict):
            table, prefix = target, f"{prefix} {name}"
            continue
        return int(_resolve(str(target))(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
