"""`braincam dicomweb --url URL --study UID [--series UID]`: analyse a study on a
DICOMweb PACS and store the results (SR + Secondary Capture) back into it.

Prints one JSON object per analysed series (with the out-of-distribution verdict and
warnings; the model's notice and any warning also go to stderr). Exit status: 0 done,
2 bad arguments, 1 the PACS or the input refused, or `--ood-policy reject` refused a
series the gate flagged, and then nothing was stored (the reason on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from braincam import DISCLAIMER


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="braincam dicomweb",
        description="Fetch a series by WADO-RS, classify it, store a DICOM SR and a "
        f"Secondary Capture back by STOW-RS. {DISCLAIMER}",
    )
    parser.add_argument("--url", required=True, help="DICOMweb root, e.g. http://pacs/dicom-web")
    parser.add_argument("--study", required=True, help="StudyInstanceUID")
    parser.add_argument(
        "--series",
        action="append",
        default=[],
        help="SeriesInstanceUID (repeatable); default: every image series of the study",
    )
    parser.add_argument(
        "--model-dir",
        default=os.environ.get("BRAINCAM_MODEL_DIR", "models/demo"),
        help="model directory (default: $BRAINCAM_MODEL_DIR or models/demo)",
    )
    parser.add_argument("--no-store", action="store_true", help="analyse only, store nothing")
    parser.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME: VALUE",
        help="HTTP header for the PACS, e.g. 'Authorization: Bearer ...' (repeatable)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="PACS timeout, seconds")
    parser.add_argument(
        "--ood-policy",
        choices=("warn", "reject"),
        default=os.environ.get("BRAINCAM_OOD_POLICY", "warn").strip().lower() or "warn",
        help="a series whose every slice the out-of-distribution gate flags: stored with "
        "the warning (warn), or refused with nothing stored (reject); default: "
        "$BRAINCAM_OOD_POLICY or warn",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    headers = {}
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            print(f"--header must be 'Name: value', got {header!r}", file=sys.stderr)
            return 2
        headers[name.strip()] = value.strip()

    from braincam.dicomweb import PacsError, analyse_study, connect, summary
    from braincam.errors import InputError
    from braincam.inference import OnnxModel

    model = OnnxModel(args.model_dir)
    client = connect(args.url, headers or None, args.timeout)
    try:
        analysed = analyse_study(
            client,
            model,
            args.study,
            args.series,
            store=not args.no_store,
            ood_policy=args.ood_policy,
        )
    except (InputError, PacsError) as exc:
        print(f"braincam dicomweb: {exc}", file=sys.stderr)
        return 1
    for item in analysed:
        line = summary(item)
        print(json.dumps(line))
        for warning in line["warnings"]:
            print(
                f"braincam dicomweb: warning: series {line['series_instance_uid']}: "
                f"{warning['detail']}",
                file=sys.stderr,
            )
    if model.spec.notice:
        print(f"braincam dicomweb: model notice: {model.spec.notice}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
