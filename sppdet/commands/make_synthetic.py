"""``sppdet make-synthetic --out DIR``: a deterministic synthetic VOC-format data set."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "make-synthetic",
        help="write a deterministic synthetic VOC-format dataset",
        description="Write the synthetic 'sppdet-shapes' data set (5 classes defined by shape and "
                    "texture: checker, cross, ring, star, triangle; random colours; cluttered "
                    "backgrounds) as a VOC root: Annotations/, JPEGImages/, "
                    "ImageSets/Main/{trainval,test}.txt, README.txt. The same settings give "
                    "byte-identical files; an existing identical set is reused.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to create (a VOC root)")
    p.add_argument("--images", type=int, default=300, metavar="N", help="number of images (default 300)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--test-fraction", type=float, default=0.5, metavar="F",
                   help="fraction of the images in the test split (default 0.5)")
    p.add_argument("--clutter", type=float, default=1.0, metavar="X",
                   help="scale the number of distractor shapes and background blobs (default 1.0)")
    p.add_argument("--force", action="store_true", help="regenerate even if DIR already holds this set")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.synthetic import make_synthetic
    from ..data.voc import load_voc

    out = make_synthetic(args.out, num_images=args.images, seed=args.seed,
                         test_fraction=args.test_fraction, clutter=args.clutter, force=args.force)
    for split in ("trainval", "test"):
        ds = load_voc(out, split)
        n_obj = sum(r.num_objects for r in ds)
        n_diff = sum(int(r.difficult.sum()) for r in ds)
        print(f"{split}: {len(ds)} images, {n_obj} objects ({n_diff} difficult)")
    print(f"wrote {out} (classes: {', '.join(ds.classes)})")
    return 0
