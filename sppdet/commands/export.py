"""``sppdet export``: the detector's networks as TorchScript (and ONNX) files plus export.json."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="write the backbone and the SPP/fc/SVM/regressor head as TorchScript (or ONNX)",
        description="Writes DIR/backbone.torchscript.pt (normalised image [1,3,H,W] -> conv5 map), "
                    "DIR/head.torchscript.pt (conv5 map, windows in original-image pixels, resize factor -> "
                    "SVM scores [N,K] and regressed boxes [N,K,4]) and DIR/export.json (classes, scales, "
                    "normalisation, geometry, test settings). Proposals, resizing, scale choice, flip and NMS "
                    "stay in Python/OpenCV; see the README's Export section.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="model.pt written by sppdet train")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--format", default="torchscript", metavar="F",
                   help="torchscript (default), onnx (needs the onnx package) or all")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoint import load_detector
    from ..export import FORMATS, ExportError, export_detector

    if args.format not in FORMATS:      # before loading anything
        raise ExportError(f"--format {args.format!r}: choose torchscript, onnx or all")
    model, cfg = load_detector(args.checkpoint)
    proposals = {"preset": cfg.proposals.mode, "overrides": dict(cfg.proposals.overrides),
                 "max_boxes": int(cfg.proposals.max_boxes)}
    written = export_detector(model, args.out, checkpoint=args.checkpoint, fmt=args.format, proposals=proposals)
    for key, path in written.items():
        print(f"{key}: {path}")
    return 0
