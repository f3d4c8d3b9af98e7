"""How a stage or job script starts and ends: one parser convention, one logging set-up, one
config load, one mapping from exceptions to exit statuses.

    def main(argv: list[str] | None = None) -> dict:
        parser = stage_parser("Evaluate reconstruction and editing (DVC stage).", data=True)
        parser.add_argument("--out", type=Path, default=Path("eval"))
        args, cfg = parse_and_load(parser, argv)
        ...                                   # raises on bad input: tests call main() directly

    if __name__ == "__main__":
        run_main("evaluate", main, failures=(ValueError, FileNotFoundError, KeyError))

Exit statuses: 0 done; 2 bad arguments or settings, nothing done (argparse's own errors,
:class:`hfedit.config.ConfigError`, :class:`hfedit.validation.UsageError`); 1 a known failure
(:class:`hfedit.device.DeviceUnavailable` and the script's ``failures``), each as one line
``<script>: <message>`` on stderr; anything else propagates with its traceback. A ``main`` that
returns an int sets the status itself.

Only the standard library at the top: prepare's decode processes import their ``__main__``
again and must stay light. Records and decides nothing a stage writes (arguments, logging and
exit statuses only), so, like :mod:`pipelines.tracking`, it is no DVC dep of the stages.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Callable, NoReturn

if TYPE_CHECKING:
    from hfedit.config import HfeditConfig

EXIT_FAILED, EXIT_USAGE = 1, 2


def stage_parser(description: str, data: bool = False) -> argparse.ArgumentParser:
    """An argument parser with what every script takes: ``--set KEY=VALUE`` config overrides
    (repeatable) and, with ``data``, ``--data`` (the prepared folder: a path, or a URI every
    node sees; default ``data/prepared``)."""
    parser = argparse.ArgumentParser(description=description)
    if data:
        from hfedit.data.prepared import data_location

        parser.add_argument("--data", type=data_location, default=data_location("data/prepared"),
                            help="prepared folder: a path, or a URI every node sees (s3://, file://)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override, e.g. data.resolution=64")
    return parser


def setup_logging() -> None:
    """Warnings of every library on stderr, and hfedit's own progress (INFO): not open_clip's
    or Ray's INFO chatter."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hfedit").setLevel(logging.INFO)


def parse_and_load(parser: argparse.ArgumentParser, argv: list[str] | None = None
                   ) -> tuple[argparse.Namespace, "HfeditConfig"]:
    """Parse ``argv`` (bad arguments: argparse exits 2), set up logging, load the config
    (params.yaml, its profile, then ``--set`` overrides; raises ConfigError) and set this
    process's torch threads (:func:`hfedit.device.set_threads`)."""
    from hfedit.config import load_config

    args = parser.parse_args(argv)
    setup_logging()
    cfg = load_config(overrides=args.overrides)
    from hfedit.device import set_threads

    set_threads(cfg.runtime.torch_threads)  # the CPUs this process was given, logged
    return args, cfg


def run_main(name: str, main: Callable[[], object],
             failures: tuple[type[BaseException], ...] = (), uri_flags: tuple[str, ...] = ()
             ) -> NoReturn:
    """Run a script's ``main()`` as the process and exit with its status (the module doc).
    Object-store URIs are refused before any work except as the values of ``uri_flags``."""
    from hfedit.config import ConfigError
    from hfedit.device import DeviceUnavailable
    from hfedit.validation import UsageError

    from hfedit.validation import refuse_uris

    try:
        refuse_uris(sys.argv[1:], name, uri_flags)
        status = main()
    except (ConfigError, UsageError) as err:  # bad arguments or settings: nothing done
        _say(name, err)
        sys.exit(EXIT_USAGE)
    except (DeviceUnavailable, *failures) as err:
        _say(name, err)
        sys.exit(EXIT_FAILED)
    sys.exit(status if isinstance(status, int) and not isinstance(status, bool) else 0)


def _say(name: str, err: BaseException) -> None:
    """``<name>: <message>`` on stderr, once (a message that names the script already is kept)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    print(text if str(text).startswith(f"{name}:") else f"{name}: {text}", file=sys.stderr)
