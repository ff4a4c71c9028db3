"""``instdiff edit IMAGE --target TEXT``: one image, one edit, written to PNG."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from instdiff.config import EditConfig, Method
from instdiff.errors import UsageError
from pipelines import storage
from pipelines.commands import add_model_args, int_arg

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``edit`` subcommand to ``sub`` (its ``func`` is :func:`run`)."""
    p = sub.add_parser(
        "edit",
        help="edit one image with a text prompt",
        description="Edit IMAGE so that it matches --target; writes the edited PNG and the mask.",
    )
    p.add_argument(
        "image",
        help="input image file (PNG, JPEG, WebP, ...); read as a viewer shows it: EXIF orientation applied, "
        "the first frame of an animated file",
    )
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
        type=int_arg,
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
        default=None,
        choices=["model", "paper"],
        help="InstDiffEdit settings: model (the default) = the model folder's instdiff.json (the embedded model: its "
        "measured best variant; SD checkpoints: the paper's), or paper = the paper's Eq. 6-9 and loop",
    )
    p.add_argument("--noises", type=int_arg, default=None, help="InstDiffEdit parallel noises n (paper: 3)")
    p.add_argument("--phi", type=float, default=None, help="InstDiffEdit binarisation threshold φ (paper: 0.2)")
    p.add_argument(
        "--mask-preset",
        default="paper",
        choices=["paper", "official"],
        help="InstDiffEdit mask computation: the paper's Eq. 6-9, or the official code's recipe (8-bit per-word "
        "maps, its blur and thresholds, blending at the current step), which also conditions on the target's "
        "words absent from --source; official implies --preset paper",
    )
    p.add_argument("--seed", type=int_arg, default=0)
    p.add_argument(
        "--feather",
        type=int_arg,
        default=EditConfig.feather,
        help="soft edge in px, outside the mask, where an edit made at a smaller working size is pasted onto "
        f"the original pixels; beyond it the output equals the input (default {EditConfig.feather}, 0 = hard edge)",
    )
    p.add_argument(
        "--size-policy",
        default="resize",
        choices=["resize", "pad"],
        help="what to do when a side is not a multiple of the model's step",
    )
    p.add_argument(
        "--size",
        type=int_arg,
        default=None,
        help="resize so the longer side is SIZE px (default: keep; the embedded model works at 64)",
    )
    p.add_argument("--out", required=True, help="edited image (PNG)")
    p.add_argument("--mask-out", default=None, help="where to write the predicted edit mask (PNG)")
    p.add_argument(
        "--mask",
        default=None,
        help="ground-truth mask of the region that should change (non-zero = edit; transparency where it has "
        "transparent pixels), the input's size as shown; the summary then reports iou, c_m and c_non",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Edit one image and write the PNG (and the mask); print a JSON summary line.

    Steps, guidance and (``--preset model``) InstDiffEdit's settings default to the model folder's
    ``instdiff.json`` (:meth:`instdiff.config.EditConfig.for_model`), else the paper's. With the
    embedded model (``--model default``) and no ``--size``, the image is resized to the model's resolution.
    The image (and ``--mask``) are read as a viewer shows them (:func:`instdiff.imageio.decode_image`: EXIF
    orientation applied, the first frame of an animated file); what was done is logged as warnings and listed
    in the summary's ``notes``; ``width``/``height`` are the upright size, which the outputs have. With
    ``--mask`` (non-zero = edit, :func:`instdiff.imageio.decode_mask`) the summary adds ``iou``, ``c_m`` and
    ``c_non`` (InstDiffEdit Eq. II–III), as the batch job scores its ``mask`` column. The summary's ``preset``
    says which settings ran (``model`` or ``paper``; ``--mask-preset official`` runs on the paper's loop, so
    ``paper``, as the batch job records it), ``mask_preset`` which mask computation InstDiffEdit used
    (``paper``: Eq. 6–9 with the preset's options; ``official``; null for the other editors), and
    ``unet_calls`` is the edit's UNet evaluations (an int; classifier-free guidance counts 2).

    Returns:
        0.

    Raises:
        UsageError: ``--out`` or ``--mask-out`` is not a ``.png`` file, or ``--mask-preset official`` with
            another method than InstDiffEdit.
        StorageError: ``--out`` or ``--mask-out`` is a folder, or a file is in the way of its parent folders.
        ImageInputError: the image cannot be decoded or brought to the model's geometry; the mask cannot be
            decoded, has another size than the image, or has no edit pixel.
        ModelLoadError: the model cannot be loaded.
    """
    import torch

    from instdiff import imageio
    from instdiff.composite import restore
    from instdiff.editing import edit, size_multiple
    from instdiff.inputs import require_source, source_advice, working_size
    from instdiff.models import load_bundle

    out = Path(args.out)
    if args.size is not None and args.size < 16:
        raise UsageError(f"--size must be at least 16 px (the longer side after resizing), got {args.size}")
    require_source(args.method, args.source, "--source")
    if args.mask_preset != "paper" and args.method != "instdiffedit":
        raise UsageError(f"--mask-preset {args.mask_preset} applies to --method instdiffedit only; got {args.method}")
    if args.mask_preset == "official" and args.preset == "model":
        raise UsageError(
            "--mask-preset official runs on the paper's loop: leave --preset out or give --preset paper (the batch "
            "job's method.preset has the same rule)"
        )
    for flag, path in (("--out", args.out), ("--mask-out", args.mask_out)):
        if path is None:
            continue
        if Path(path).suffix.lower() != ".png":
            raise UsageError(f"{flag} must be a .png file, got {path!r}")
        storage.check_output(path, flag)
    array, notes = imageio.decode_image(args.image)
    gt = None
    if args.mask is not None:  # checked before the model loads: a wrong mask costs no edit
        mask_notes: list[str] = []
        gt = imageio.decode_mask(args.mask, size=(array.shape[1], array.shape[0]), notes=mask_notes)
        notes.extend(f"mask: {n}" for n in mask_notes)
    bundle = load_bundle(
        args.model,
        device=args.device,
        dtype=args.dtype,
        local_files_only=args.local_files_only,
        inpaint=args.inpaint_model,
    )
    size = working_size(bundle, args.model, (array.shape[1], array.shape[0]), args.size)
    if size is not None and args.size is None:
        notes.append(f"the embedded model works at {size} px")
    prepared = imageio.fit_to_multiple(array, size_multiple(bundle), args.size_policy, size)
    notes += prepared.notes
    for note in notes:
        log.warning("%s", note)
    given = {"steps": args.steps, "guidance": args.guidance, "n_noises": args.noises}
    overrides: dict = {k: v for k, v in given.items() if v is not None}
    mask = {} if args.phi is None else {"phi": args.phi}
    preset = args.preset or "model"
    if args.mask_preset == "official":  # the official recipe on the paper's loop, conditioned on the edit words
        preset = "paper"
        mask["preset"] = "official"
        overrides["prompt_mode"] = "edit_words"
    if mask:
        overrides["mask"] = mask
    cfg = EditConfig.for_model(
        bundle.defaults,
        preset,
        method=Method(args.method),
        strength=args.strength,
        seed=args.seed,
        feather=args.feather,
        **overrides,
    )
    advice = source_advice(cfg, args.source)
    if advice:
        log.warning("%s", advice)
        notes.append(advice)
    source = args.source if args.source is not None else args.target
    result = edit(bundle, imageio.to_model_tensor(prepared.array), [source], [args.target], cfg)
    # the edit at the input's size, pasted onto the original pixels outside the mask (instdiff.composite)
    ((edited, mask),) = restore(result, [array], [prepared], cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(imageio.encode_png(edited))
    if args.mask_out:
        Path(args.mask_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.mask_out).write_bytes(imageio.encode_png(mask.astype(bool)))
    summary = {
        "method": cfg.method.value,
        "preset": preset,
        "mask_preset": cfg.mask.preset.value if cfg.method is Method.INSTDIFFEDIT else None,
        "model": bundle.name,
        "out": str(out),
        "mask_out": args.mask_out,
        "width": int(array.shape[1]),
        "height": int(array.shape[0]),
        "notes": notes,
        "mask_area": float(mask.mean()),
        "unet_calls": round(result.unet_calls),  # one image: a whole number of UNet evaluations
        "seconds": round(result.timings["total"], 3),
        "device": str(bundle.device),
        "dtype": str(bundle.dtype).replace("torch.", ""),
        "torch": torch.__version__,
    }
    if gt is not None:
        from instdiff import metrics

        summary["iou"] = float(metrics.iou(mask.astype(bool), gt)[0])
        for key, fn in (("c_m", metrics.change_in_mask), ("c_non", metrics.change_outside_mask)):
            value = float(fn(array, edited, gt)[0])
            summary[key] = None if value != value else value  # NaN: an empty region
    print(json.dumps(summary))
    return 0
