"""``icp generate``: profile photo(s) + target portrait -> the target with the profile's identity.

    icp generate --profile me.png [--profile me2.png] --target pose.png --checkpoint runs/adaptation/x \\
        [--prompt "a photo of a person"] [--steps 20] [--seed 0] [--light other.png | --light "dir=-1,0,1"] \\
        --out out.png

It says which checkpoint it resolved and what the run trained on (resolution, synthetic renders or
real photos), warns when photos meet a model trained only on renders, and writes out.strip.png
(profile | target | output, the aligned crops the model saw) beside out.png.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="re-render a target portrait with the identity of profile photo(s)",
        description="Profile photo(s) + target portrait -> the target's pose, lighting and composition with "
                    "the profile's identity (IC-Portrait adaptation run needed).")
    p.add_argument("--profile", action="append", required=True, metavar="P.png",
                   help="identity photo; repeat for several photos of the same person")
    p.add_argument("--target", required=True, metavar="T.png", help="portrait whose pose/lighting to keep")
    p.add_argument("--checkpoint", required=True, metavar="RUN|CKPT",
                   help="an adaptation run directory (newest checkpoint), a .ckpt inside one, the main job's root "
                        "(icp run) or a claims sub-run")
    p.add_argument("--out", required=True, metavar="O.png",
                   help="where to write the result (PNG); O.strip.png beside it shows profile | target | output")
    p.add_argument("--prompt", default=None, help="text prompt (default: the run's training prompt)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and the target masking")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: run's)")
    p.add_argument("--light", default=None, metavar="L.png|SPEC",
                   help="relight: another portrait (its lighting) or 'dir=x,y,z;color=r,g,b;ambient=a'")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-align", action="store_true",
                   help="skip face detection/alignment of photos (inputs are already aligned crops; icp's own "
                        "renders are recognised and need no alignment)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint that needs full unpickling: this RUNS PICKLED CODE FROM THE FILE; "
                        "use only for files from someone you trust")
    p.set_defaults(func=handler)


MAX_STEPS = 1000
MAX_GUIDANCE = 100.0


def handler(args: argparse.Namespace) -> int:
    from icp.core.errors import DataError
    from icp.inference import DOMAINS, PortraitPipeline, looks_rendered, read_image, save_image

    if not 1 <= args.steps <= MAX_STEPS:
        raise DataError(f"--steps {args.steps}: use 1 to {MAX_STEPS} denoising steps")
    # NaN, inf or 1e30 would give an all-black image and exit 0: refused before anything loads.
    if args.guidance is not None and not (math.isfinite(args.guidance) and 0 <= args.guidance <= MAX_GUIDANCE):
        raise DataError(f"--guidance {args.guidance}: use a finite scale between 0 and {MAX_GUIDANCE}")
    if args.light and "=" in args.light and not Path(args.light).exists():
        from icp.inference import parse_light_spec

        try:
            parse_light_spec(args.light)
        except DataError as err:
            raise DataError(f"--light: {err}") from None
    if args.device is not None:
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise DataError(f"--device {args.device}: no CUDA GPU is available here; use --device cpu")
        try:
            torch.device(args.device)
        except RuntimeError:
            raise DataError(f"--device {args.device!r}: not a device (cpu, cuda, cuda:1)") from None
    for path in [*args.profile, args.target] + ([args.light] if args.light and "=" not in args.light else []):
        if not Path(path).is_file():
            raise DataError(f"{path}: no such image file")
    pipe = PortraitPipeline.from_checkpoint(args.checkpoint, device=args.device, align=not args.no_align,
                                         trust_checkpoint=args.trust_checkpoint)
    print(f"icp: checkpoint {pipe.checkpoint}; trained on {pipe.domain}; output {pipe.resolution}x{pipe.resolution} px")
    if pipe.domain and pipe.domain.startswith(DOMAINS["synthetic"]):
        images = [*args.profile, args.target] + ([args.light] if args.light and Path(args.light).is_file() else [])
        photos = [p for p in dict.fromkeys(images) if not looks_rendered(read_image(p)[0])]
        if photos:
            what = "looks like a real photo" if len(photos) == 1 else "look like real photos"
            log.warning("%s %s, but this model was trained only on %s: expect a render-like face (a model "
                        "trained on imported photos, `icp shards import`, suits photos)", ", ".join(photos), what,
                        pipe.domain)
    image = pipe(args.profile, args.target, prompt=args.prompt, steps=args.steps, seed=args.seed,
                 light=args.light, guidance_scale=args.guidance)
    out = save_image(image, args.out)
    strip = out.with_name(f"{out.stem}.strip.png")
    pipe.strip(image).save(strip)
    print(f"icp: wrote {out} and {strip} (profile | target | output)")
    return 0
