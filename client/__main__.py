"""python -m client extract TEXT|-|--file PATH | python -m client batch INPUT OUTPUT [--concurrency N] ...

``--base-url`` may be repeated: the requests are spread over those servers, with fail-over.
``--timeout S`` bounds each request attempt (connecting at most 5 s of it).

Exit status: 0 done; 1 an extraction failed (extract), OUTPUT holds failed records or the key was
rejected (batch); 2 a bad argument, file or text; 75 (EX_TEMPFAIL) no server answers: the batch
stopped, and the same command run again goes on; 130 (Ctrl-C) or 143 (SIGTERM) interrupted: a later
run goes on from there.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import math
import signal
import sys
from importlib import metadata
from pathlib import Path
from typing import BinaryIO, NoReturn

import httpx

from client._client import AsyncEndpointClient, EndpointClient
from client._constants import BATCH_MAX_LINE_BYTES, DEFAULT_CONCURRENCY, DEFAULT_MODEL, DEFAULT_TIMEOUT
from client._exceptions import (
    APITimeoutError,
    BatchError,
    EndpointError,
    InvalidInputError,
    ServerUnavailableError,
)

EX_TEMPFAIL = 75  # sysexits.h: try again later
DISTRIBUTION = "endpoint-extractor"
TEXT_RULE = (
    "Text read from standard input or a file is sent exactly as read (no newline translation, "
    "no trimming), except that one line ending at its very end (\\n or \\r\\n, as echo adds) and a "
    "UTF-8 byte-order mark at its start are dropped."
)


def version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other error here; --help shows the usage.
        self.exit(2, f"{self.prog}: error: {message}\n")


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted before and after the command; after it, SUPPRESS keeps a value given before it.
    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "--base-url",
        action="append",
        default=default(None),
        help="server URL; repeat it to spread the requests over several servers "
        "(default: ENDPOINT_BASE_URL or local)",
    )
    parser.add_argument("--api-key", default=default(None), help="bearer token (default: ENDPOINT_API_KEY)")
    parser.add_argument("--model", default=default(DEFAULT_MODEL), help="served model name")
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=default(None),
        metavar="S",
        help=f"seconds each request attempt may take (default: {DEFAULT_TIMEOUT.read:g}); "
        "a request that times out is retried, then fails alone",
    )


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}")
    return number


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {value!r}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m client", description="Endpoint extractor client")
    parser.add_argument("--version", action="version", version=f"{DISTRIBUTION} {version()}")
    _common(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True)
    extract = commands.add_parser(
        "extract",
        help="extract the endpoints of one text, print JSON",
        description="Extract the endpoints of one text and print them as JSON. " + TEXT_RULE,
    )
    source = extract.add_mutually_exclusive_group(required=True)
    source.add_argument("text", nargs="?", help="endpoint text, sent as given ('-' reads standard input)")
    source.add_argument(
        "--file", type=Path, metavar="PATH", help="read the text from this file ('-': standard input)"
    )
    _common(extract, top=False)

    batch = commands.add_parser(
        "batch",
        help="extract every record of a JSONL, CSV or OpenAI Batch file; resumable",
        description="Extract every record of INPUT into OUTPUT (JSONL), exactly once per id. "
        "Run it again to go on after a crash or Ctrl-C; --retry-failed reruns the failures.",
    )
    batch.add_argument(
        "input", type=Path, help="JSONL, CSV, or OpenAI Batch JSONL (custom_id/method/url/body)"
    )
    batch.add_argument("output", type=Path, help="JSONL results; appended to, never truncated")
    batch.add_argument(
        "--concurrency", type=_positive, default=DEFAULT_CONCURRENCY, help="requests in flight"
    )
    batch.add_argument(
        "--format",
        choices=("auto", "jsonl", "csv", "openai"),
        default="auto",
        help="INPUT format (auto: .csv by name, OpenAI Batch by its custom_id/body keys, else JSONL)",
    )
    batch.add_argument("--id-field", default=None, help="id field or column (default: id)")
    batch.add_argument("--text-field", default=None, help="text field or column (default: text)")
    batch.add_argument("--retry-failed", action="store_true", help="rerun the records OUTPUT holds as failed")
    batch.add_argument(
        "--limit", type=_positive, default=None, help="stop after this many records (a later run goes on)"
    )
    batch.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on standard error (default: when it is a terminal)",
    )
    _common(batch, top=False)
    return parser


def read_text(stream: BinaryIO, name: str) -> str:
    """The text of a file or of standard input by the rule in TEXT_RULE; InvalidInputError when it
    is not UTF-8."""
    # Bounded: the server takes no body over 1 MB, and /dev/zero must not fill the memory.
    data = stream.read(BATCH_MAX_LINE_BYTES + 1)
    if len(data) > BATCH_MAX_LINE_BYTES:
        raise InvalidInputError(f"{name} holds more than {BATCH_MAX_LINE_BYTES} bytes")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    for ending in (b"\r\n", b"\n"):
        if data.endswith(ending):
            data = data[: -len(ending)]
            break
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{name} is not valid UTF-8 (byte offset {exc.start})") from None


def _extract_text(args: argparse.Namespace) -> str:
    if args.file is None and args.text != "-":
        return str(args.text)
    if args.file is None or str(args.file) == "-":
        if sys.stdin is None:  # started with standard input closed
            raise InvalidInputError("standard input is closed")
        return read_text(sys.stdin.buffer, "standard input")
    try:
        with args.file.open("rb") as f:
            return read_text(f, str(args.file))
    except OSError as exc:
        raise InvalidInputError(f"cannot read {args.file}: {exc.strerror or exc}") from None


def _timeout(seconds: float | None) -> httpx.Timeout:
    if seconds is None:
        return DEFAULT_TIMEOUT
    return httpx.Timeout(seconds, connect=min(seconds, DEFAULT_TIMEOUT.connect or seconds))


def _error(message: object) -> None:
    """One line on standard error, whatever the text it quotes holds."""
    print("client: error: " + " ".join(str(message).split()), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "batch":
        return _batch(args)
    try:
        client = EndpointClient(
            args.base_url, api_key=args.api_key, model=args.model, timeout=_timeout(args.timeout)
        )
    except (ValueError, TypeError) as exc:  # --base-url, --api-key, --model or their ENDPOINT_*
        _error(exc)
        return 2
    try:
        text = _extract_text(args)
        with client:
            print(client.extract(text).model_dump_json(indent=2))
    except EndpointError as exc:
        _error(f"{type(exc).__name__}: {exc}{_timeout_hint(exc, args.timeout)}")
        return 2 if isinstance(exc, InvalidInputError) else 1
    return 0


def _timeout_hint(exc: EndpointError, seconds: float | None) -> str:
    if not isinstance(exc, APITimeoutError):
        return ""
    return f" (each attempt may take {seconds or DEFAULT_TIMEOUT.read:g} s: --timeout)"


def _batch(args: argparse.Namespace) -> int:
    from client.batch import BatchConfig, BatchJob

    job = BatchJob(
        BatchConfig(
            input=args.input,
            output=args.output,
            format=args.format,
            id_field=args.id_field or "id",
            text_field=args.text_field or "text",
            concurrency=args.concurrency,
            retry_failed=args.retry_failed,
            limit=args.limit,
            progress=sys.stderr.isatty() if args.progress is None else args.progress,
        )
    )

    try:
        client = AsyncEndpointClient(
            args.base_url,
            api_key=args.api_key,
            model=args.model,
            timeout=_timeout(args.timeout),
            max_connections=args.concurrency,
        )
    except (ValueError, TypeError) as exc:  # --base-url, --api-key, --model or their ENDPOINT_*
        _error(exc)
        return 2

    async def run() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        async with client:
            await job.run(client)

    try:
        asyncio.run(run())
    except BatchError as exc:
        _error(exc)
        return 2
    except ServerUnavailableError as exc:
        job.summary.interrupted = True
        _error(f"{exc}{_timeout_hint(exc, args.timeout)}")
        print(job.summary.describe() + "; run the same command again to go on", file=sys.stderr)
        return EX_TEMPFAIL
    except EndpointError as exc:  # the key was rejected, or the server answered nonsense
        _error(f"{type(exc).__name__}: {exc}")
        if job.summary.total:  # it had started
            job.summary.interrupted = True
            print(job.summary.describe(), file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"client: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        job.summary.interrupted = True
        print(job.summary.describe(), file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt) else 128 + signal.SIGTERM
    print(job.summary.describe(), file=sys.stderr)
    return 1 if job.summary.output_failed else 0


if __name__ == "__main__":
    sys.exit(main())
