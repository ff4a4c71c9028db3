"""``instdiff edit IMAGE --target TEXT``: one image, one edit, written to PNG."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from instdiff.config import EditConfig, Method
from instdiff.errors import UsageError
from pipelines import storage
from pipelines.commands import add_model_args

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``edit`` subcommand to ``sub`` (its ``func`` is :func:`run`)."""
    p = sub.add_parser(
        "edit",
        help="edit one image with a text prompt",
        description="Edit IMAGE so that it matches --target; writes the edited PNG and the mask.",
    )
    p.add_argument("image", help="input image file (PNG, JPEG, WebP, ...)")
    p.add_argument("--target", required=True, help="target prompt, e.g. 'a blue square on a gray background'")
    p.add_argument(
        "--source",
        default=None,
        help="source prompt describing the input (required by diffedit, which contrasts the two prompts; "
        "instdiffedit's embedded-model default finds the edited words' region from it, and without it uses "
        "the paper's token choice; sdedit does not read it)",
    )
    p.add_argument("--method", default="instdiffedit", choices=["instdiffedit", "sdedit", "diffedit"])
    add_model_args(p)
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="DDIM steps (default: the model folder's instdiff.json, else the paper's 50)",
    )
    p.add_argument("--strength", type=float, default=0.5, help="noise strength r in (0, 1] (paper: 0.5)")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance (default: the model folder's instdiff.json, else the paper's 7.5)",
    )
    p.add_argument(
        "--preset",
        default="model",
        choices=["model", "paper"],
        help="InstDiffEdit settings: the model folder's instdiff.json (the embedded model: its measured best "
        "variant; SD checkpoints: the paper's) or the paper's Eq. 6-9 and loop",
    )
    p.add_argument("--noises", type=int, default=None, help="InstDiffEdit parallel noises n (paper: 3)")
    p.add_argument("--phi", type=float, default=None, help="InstDiffEdit binarisation threshold φ (paper: 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--size-policy",
        default="resize",
        choices=["resize", "pad"],
        help="what to do when a side is not a multiple of the model's step",
    )
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="resize so the longer side is SIZE px (default: keep; the embedded model works at 64)",
    )
    p.add_argument("--out", required=True, help="edited image (PNG)")
    p.add_argument("--mask-out", default=None, help="where to write the predicted edit mask (PNG)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Edit one image and write the PNG (and the mask); print a JSON summary line.

    Steps, guidance and (``--preset model``) InstDiffEdit's settings default to the model folder's
    ``instdiff.json`` (:meth:`instdiff.config.EditConfig.for_model`), else the paper's. With the
    embedded model (``--model default``) and no ``--size``, the image is resized to the model's resolution.

    Returns:
        0.

    Raises:
        UsageError: ``--out`` or ``--mask-out`` is not a ``.png`` file.
        StorageError: ``--out`` or ``--mask-out`` is a folder, or a file is in the way of its parent folders.
        ImageInputError: the image cannot be decoded or brought to the model's geometry.
        ModelLoadError: the model cannot be loaded.
    """
    import torch

    from instdiff import imageio
    from instdiff.editing import edit, size_multiple
    from instdiff.models import load_bundle

    out = Path(args.out)
    if args.size is not None and args.size < 16:
        raise UsageError(f"--size must be at least 16 px (the longer side after resizing), got {args.size}")
    if args.source is None and Method(args.method).needs_source_prompt():
        raise UsageError(f"--source is required by {args.method}: a description of the input image")
    for flag, path in (("--out", args.out), ("--mask-out", args.mask_out)):
        if path is None:
            continue
        if Path(path).suffix.lower() != ".png":
            raise UsageError(f"{flag} must be a .png file, got {path!r}")
        storage.check_output(path, flag)
    array, notes = imageio.decode_image(args.image)
    bundle = load_bundle(
        args.model,
        device=args.device,
        dtype=args.dtype,
        local_files_only=args.local_files_only,
        inpaint=args.inpaint_model,
    )
    size = args.size
    if size is None and args.model == "default" and max(array.shape[:2]) != bundle.resolution:
        size = bundle.resolution
        notes.append(f"the embedded model works at {size} px")
    prepared = imageio.fit_to_multiple(array, size_multiple(bundle), args.size_policy, size)
    for note in notes + prepared.notes:
        log.warning("%s", note)
    given = {"steps": args.steps, "guidance": args.guidance, "n_noises": args.noises}
    overrides = {k: v for k, v in given.items() if v is not None}
    if args.phi is not None:
        overrides["mask"] = {"phi": args.phi}
    cfg = EditConfig.for_model(
        bundle.defaults, args.preset, method=Method(args.method), strength=args.strength, seed=args.seed, **overrides
    )
    source = args.source if args.source is not None else args.target
    result = edit(bundle, imageio.to_model_tensor(prepared.array), [source], [args.target], cfg)
    edited = imageio.undo_fit(imageio.from_model_tensor(result.images)[0], prepared)
    mask = imageio.undo_fit(result.masks[0, 0].numpy(), prepared)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(imageio.encode_png(edited))
    if args.mask_out:
        Path(args.mask_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.mask_out).write_bytes(imageio.encode_png(mask.astype(bool)))
    summary = {
        "method": cfg.method.value,
        "model": bundle.name,
        "out": str(out),
        "mask_out": args.mask_out,
        "mask_area": float(mask.mean()),
        "unet_calls": result.unet_calls,
        "seconds": round(result.timings["total"], 3),
        "device": str(bundle.device),
        "dtype": str(bundle.dtype).replace("torch.", ""),
        "torch": torch.__version__,
    }
    print(json.dumps(summary))
    return 0
