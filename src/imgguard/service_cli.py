"""The CLI's service commands: `scan -` (an image on stdin, as a stream) and `verify`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, BinaryIO

from imgguard.errors import ConfigError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def scan_stdin(args: argparse.Namespace, stdin: BinaryIO | None = None) -> int:
    """`imgguard scan -`: judge the image on stdin with `StreamInspector` and write the report.

    Reading stops at an early rejection; the report is the one `scan` writes for a file.
    """
    from imgguard import cli
    from imgguard.report import RENDERERS, Run
    from imgguard.stream import inspect_stream

    notes: list[str] = []
    policy = cli.resolve_policy(args, scanned=(), notes=notes)
    for note in notes:
        print(f"imgguard: {note}", file=sys.stderr)
    source = stdin if stdin is not None else sys.stdin.buffer
    verdict = inspect_stream(
        source,
        policy,
        expected_format=getattr(args, "claimed_format", None),
        target_size=getattr(args, "target_size", None),
        name="-",
    )
    status = cli.exit_status([verdict])
    run = Run(exit_code=status, planned=1, interrupted=False, working_directory=os.getcwd())
    cli._emit(RENDERERS[args.report]([verdict], run), getattr(args, "output", None))
    return status


def register_verify(subparsers: argparse._SubParsersAction[Any]) -> argparse.ArgumentParser:
    """Add `verify` (Glance image signatures) to `subparsers`; returns its parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "verify",
        help="verify an image's Glance signature (img_signature* properties) with a certificate",
        description=(
            "Hash IMAGE (a path, or - for stdin) in one pass and verify it against Glance's "
            "signature properties, given as a JSON file (--properties) or one by one. Exit 0 "
            "when the signature verifies, 1 when it does not or the metadata or certificate is "
            "bad, 2 for usage errors."
        ),
    )
    parser.add_argument("image", metavar="IMAGE", help="the image, or - for stdin")
    parser.add_argument(
        "--properties",
        metavar="JSON",
        help="a JSON file of image properties (Glance's `image show -f json` properties)",
    )
    parser.add_argument("--signature", metavar="BASE64", help="img_signature")
    parser.add_argument("--hash-method", metavar="NAME", help="img_signature_hash_method")
    parser.add_argument("--key-type", metavar="NAME", help="img_signature_key_type")
    parser.add_argument("--certificate-uuid", metavar="UUID", help="img_signature_certificate_uuid")
    parser.add_argument(
        "--certificate", metavar="PEM", required=True, help="the signing certificate (PEM or DER)"
    )
    parser.add_argument(
        "--require", action="store_true", help="fail for an unsigned image (no properties)"
    )
    parser.set_defaults(func=verify_command)
    return parser


def _properties(args: argparse.Namespace) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    if args.properties:
        try:
            with open(args.properties, encoding="utf-8") as file:
                document = json.load(file)
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot read the properties: {error}", key=args.properties) from None
        if not isinstance(document, dict):
            raise ConfigError("expected a JSON object", key=args.properties)
        nested = document.get("properties")
        properties.update(nested if isinstance(nested, dict) else document)
    for name, value in (
        ("img_signature", args.signature),
        ("img_signature_hash_method", args.hash_method),
        ("img_signature_key_type", args.key_type),
        ("img_signature_certificate_uuid", args.certificate_uuid),
    ):
        if value is not None:
            properties[name] = value
    return properties


def verify_command(args: argparse.Namespace) -> int:
    from imgguard.signature import SignatureError, verify_signature

    properties = _properties(args)
    try:
        with open(args.certificate, "rb") as file:
            certificate = file.read()
    except OSError as error:
        raise ConfigError(f"cannot read: {error.strerror or error}", key=args.certificate) from None
    image: str | BinaryIO = sys.stdin.buffer if args.image == "-" else args.image
    try:
        result = verify_signature(image, properties, certificate, required=args.require)
    except SignatureError as error:
        print(f"imgguard: {args.image}: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as error:
        print(f"imgguard: {args.image}: {error.strerror or error}", file=sys.stderr)
        return EXIT_FAILED
    if not result.signed:
        print(f"{args.image}: unsigned (no img_signature* properties); nothing to verify")
        return EXIT_OK
    print(
        f"{args.image}: signature verified ({result.key_type}, {result.hash_method}, "
        f"certificate {result.certificate_uuid}, {result.certificate_subject}; "
        f"{result.bytes_hashed} bytes)"
    )
    return EXIT_OK


__all__ = ["register_verify", "scan_stdin", "verify_command"]
