"""Study: the NLCD legend prior (conf/prior/nlcd_legend.yaml) on the 2018 network, both
quarter-quads, for several reference shares: does the gain depend on the one number in the
table that is not NLCD's own?

The imported 2018 CNTK model maps the real patches of each split through the framework's
predictor, once without the prior and once per reference share of barren + impervious (the
share the network is taken to assume where NLCD says nothing), scored like
`analysis/baselines.py` (4 classes, whole patches). Nothing here is fitted to either split.

    .venv/bin/python experiments/prior_layer.py [--references 0.02 0.05 0.1] [--tta none] \\
        [--cntk ../shared/models/seed-cntk/250epochs.model] \\
        [--data ../shared/data/chesapeake-sample] [--per-patch]

`--per-patch` scores each patch alone, with and without the table's own prior: where the
gain of a split comes from (one patch with a road NLCD marks as developed, or all of them).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis.baselines import patch_pairs, real_data_parser, score, scores_of  # noqa: E402
from landcover import artifacts  # noqa: E402
from landcover.artifacts.tutorial_model import load_schema  # noqa: E402
from landcover.data.scenes import quiet_georeferencing_warnings  # noqa: E402
from landcover.predict.prior import prior_table, with_prior  # noqa: E402


def main() -> int:
    quiet_georeferencing_warnings()
    parser = real_data_parser(__doc__.splitlines()[0])
    parser.add_argument("--references", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    parser.add_argument("--prior", default="nlcd_legend")
    parser.add_argument("--tta", default="none")
    parser.add_argument("--per-patch", action="store_true", help="one row per patch")
    args = parser.parse_args()
    if args.per_patch:
        return per_patch(args)
    network = artifacts.load(str(args.cntk), device="cpu")
    table = prior_table(args.prior)
    contenders = {"no prior": network}
    for share in args.references:
        changed = copy.deepcopy(table)
        changed["reference"]["barren_impervious"] = share
        contenders[f"{args.prior}, reference {share:g}"] = with_prior(network, changed)
    scheme = load_schema("chesapeake_4class")
    columns = ["overall_accuracy", *[f"iou_{c}" for c in scheme.names[1:]], "mIoU"]
    print("| split | model | " + " | ".join(columns) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in columns) + " |")
    for split in ("val", "train"):
        pairs = patch_pairs(args.data, split, args.imagery)
        for name, model in contenders.items():
            with tempfile.TemporaryDirectory() as tmp:
                row = scores_of(score(model, pairs, scheme, Path(tmp), args.tta)[0], scheme)
            print(f"| {split} | {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    return 0


def per_patch(args: argparse.Namespace) -> int:
    """Each patch scored alone, without and with the prior (the table as it is)."""
    network = artifacts.load(str(args.cntk), device="cpu")
    fused = with_prior(network, prior_table(args.prior))
    scheme = load_schema("chesapeake_4class")
    rare = scheme.names.index("barren_impervious")
    print(
        "| split | patch | labelled barren + impervious px | OA without / with | "
        "barren + impervious IoU without / with |"
    )
    print("| --- | --- | --- | --- | --- |")
    for split in ("val", "train"):
        for pair in patch_pairs(args.data, split, args.imagery):
            rows = []
            for model in (network, fused):
                with tempfile.TemporaryDirectory() as tmp:
                    matrix = score(model, [pair], scheme, Path(tmp), args.tta)[0]
                rows.append(scores_of(matrix, scheme))
                labelled_rare = int(matrix[rare, :].sum())
            oa = " / ".join(f"{r['overall_accuracy']:.3f}" for r in rows)
            iou = " / ".join(f"{r['iou_barren_impervious']:.3f}" for r in rows)
            print(f"| {split} | {pair[0].stem} | {labelled_rare} | {oa} | {iou} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
