"""`python -m hrfast <command>`: bench (the main job), info, demo, inspect (predicted GPU performance)."""
import sys

COMMANDS = {"info": "hrfast.info", "bench": "hrfast.bench", "demo": "hrfast.demo", "inspect": "hrfast.perf.inspect"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m hrfast {" + ",".join(COMMANDS) + "} [options]   (each command has --help)")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"python -m hrfast: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[command]).main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
