"""python -m client extract "TEXT" [--base-url URL] [--api-key KEY] [--model NAME]"""

from __future__ import annotations

import argparse
import sys

from client._client import EndpointClient
from client._constants import DEFAULT_MODEL
from client._exceptions import EndpointError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client", description="Endpoint extractor client")
    parser.add_argument("--base-url", default=None, help="server URL (default: ENDPOINT_BASE_URL or local)")
    parser.add_argument("--api-key", default=None, help="bearer token (default: ENDPOINT_API_KEY)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="served model name")
    commands = parser.add_subparsers(dest="command", required=True)
    extract = commands.add_parser("extract", help="extract the endpoints of one text, print JSON")
    extract.add_argument("text", help="endpoint text ('-' reads standard input)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with EndpointClient(args.base_url, api_key=args.api_key, model=args.model) as client:
            if args.command == "extract":
                text = sys.stdin.read() if args.text == "-" else args.text
                print(client.extract(text).model_dump_json(indent=2))
    except EndpointError as exc:
        print(f"client: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
