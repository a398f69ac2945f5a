"""`medsam-plugin finetune`: fine-tune the prompt encoder + mask decoder (or more) on a MONAI datalist.

Single process::

    medsam-plugin finetune --datalist dataset.json --out my_model.pth

Data-parallel (same flags)::

    torchrun --nproc_per_node=2 -m medsam_plugin.cli finetune --datalist dataset.json --out my_model.pth
"""

from __future__ import annotations

import sys

from ..views import VIEWS


def _recipes(text: str | None) -> dict | None:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        out[name.strip()] = float(weight) if weight else 1.0
    return out


def add_finetune_parser(sub) -> None:
    """Add the `finetune` sub-command to the `medsam-plugin` sub-parsers."""
    from .options import OBJECTIVES, PROMPT_RECIPES, TRAIN_MODES

    p = sub.add_parser(
        "finetune",
        help="fine-tune a model on a Decathlon-style dataset.json (MONAI); runs under torchrun too",
        description="Fine-tune LiteMedSAM's prompt encoder and mask decoder (default) with simulated "
                    "propagation prompts. The result loads with --model PATH everywhere.",
    )
    p.add_argument("--datalist", required=True, help="Decathlon-style dataset.json ('training', optional 'validation')")
    p.add_argument("--data-root", default=None, help="folder the datalist's paths are relative to (default: its folder)")
    p.add_argument("--out", required=True, help="checkpoint to write (.pth); resume state goes to OUT.resume.pt")
    p.add_argument("--model", default="lite_medsam", help="model to start from: registry name or checkpoint path")
    p.add_argument("--train", default="decoder", choices=TRAIN_MODES,
                   help="decoder: prompt encoder + mask decoder, encoder frozen and its embeddings cached (default, "
                        "CPU-friendly); all: the whole model; lora: LoRA adapters on the encoder's qkv + decoder")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--patience", type=int, default=3, help="stop after this many epochs without validation gain")
    p.add_argument("--labels", default=None, help="comma-separated label values to train on (default: the datalist's)")
    p.add_argument("--window", default=None, help="CT window (abdomen, lung, brain, bone, mr, LEVEL,WIDTH); default by modality")
    p.add_argument("--axis", default="axial", choices=VIEWS)
    p.add_argument("--min-area", type=int, default=10, help="pixels of an object for a slice to count (default 10)")
    p.add_argument("--cache-rate", type=float, default=1.0, help="MONAI CacheDataset cache rate (0 to debug)")
    p.add_argument("--cache-dir", default=None,
                   help="keep slice embeddings on disk here (default: memory only; under torchrun train_embeddings/ in "
                        "the cache root, $MEDSAM_PLUGIN_CACHE or ~/.cache/medsam_plugin)")
    p.add_argument("--no-embedding-cache", action="store_true",
                   help="re-encode slices in every step instead of caching embeddings (slow; for comparison)")
    p.add_argument("--samples-per-epoch", type=int, default=None, help="cap the samples an epoch draws")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this much wall time (checked per step)")
    p.add_argument("--recipes", default=None,
                   help=f"prompt recipe weights, e.g. 'pred=2,box=1' (known: {', '.join(PROMPT_RECIPES)})")
    p.add_argument("--max-val-pairs", type=int, default=64, help="validation slice pairs per epoch at most (default 64)")
    p.add_argument("--iou-weight", type=float, default=1.0, help="weight of the IoU-head MSE in the loss")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--fp16-weights", action="store_true", help="store the checkpoint's weights as float16 (half size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT.resume.pt")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (torchrun: one GPU per process)")
    p.add_argument("--json", default=None, help="write the training history here")
    g = p.add_argument_group("interactive objective (--objective interactive)")
    p.add_argument("--objective", default="propagation", choices=OBJECTIVES,
                   help="propagation: slice-pair recipes (the earlier trainer); interactive: SAM-style episodes "
                        "(box, one click or the neighbour's mask, then corrective clicks with the last logits fed back)")
    g.add_argument("--steps", type=int, default=600, help="optimiser steps in all (interactive)")
    g.add_argument("--max-rounds", type=int, default=6, help="corrective rounds per episode at most")
    g.add_argument("--variants", type=int, default=4, help="augmented copies of each (case, view, window)")
    g.add_argument("--slices-per-variant", type=int, default=24, help="slices encoded per augmented copy")
    g.add_argument("--synthetic-slices", type=int, default=0,
                   help="slices per (case, view, window) with a painted synthetic lesion (blob or ring)")
    g.add_argument("--synthetic-share", type=float, default=0.35, help="share of object draws given to painted lesions")
    g.add_argument("--views", default="axial,coronal,sagittal", help="slicing views to train on")
    g.add_argument("--val-every", type=int, default=100, help="validate and checkpoint every N steps")
    g.add_argument("--prompt-encoder-lr-scale", type=float, default=10.0,
                   help="learning-rate factor of the prompt encoder (its point embeddings move slowly at the decoder's rate)")
    g.add_argument("--distill-weight", type=float, default=0.5, help="weight of the stock model's box answers")
    g.add_argument("--chain-share", type=float, default=0.0,
                   help="share of steps that walk slices on the model's own answers (box+mask propagation)")
    g.add_argument("--chain-length", type=int, default=4, help="slices a chain episode walks at most")
    g.add_argument("--empty-weight", type=float, default=1.0,
                   help="weight of the leak term on targets past an object's end (predicted area P costs P/(P+16))")
    g.add_argument("--far-prompt-share", type=float, default=0.0,
                   help="share of mask-prompted starts whose prompt is the object's mask 2..--far-prompt-reach slices "
                        "away (a drifted carried mask), so the model follows the image rather than copying the prompt")
    g.add_argument("--far-prompt-reach", type=int, default=5, help="farthest slice a far prompt comes from")
    g.add_argument("--end-chain-share", type=float, default=0.0,
                   help="share of chain episodes that start near an object's end and walk past it")
    g.add_argument("--stop-policy", default=None,
                   help="the propagation stop rule the checkpoint is used with (a name of engine.propagation.POLICIES, "
                        "e.g. lesion-interactive); written into its meta")
    g.add_argument("--keep-checkpoints", action="store_true",
                   help="also keep OUT_stepN.pth at every validation (to choose one by 3D walks afterwards)")
    g.add_argument("--teacher-model", default=None,
                   help="model whose box answers are distilled (default: the model trained from)")
    g.add_argument("--ct-windows", default=None, help="CT windows of the slice bank (default abdomen,lung,bone,brain)")
    g.add_argument("--validation-datalist", default=None, help="a datalist whose 'validation' cases validate")
    g.add_argument("--bf16", default="auto", choices=("auto", "on", "off"),
                   help="bfloat16 autocast of the decoder on CPU; auto: on where the CPU has AMX or AVX512-BF16")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def config_from_args(args):
    from .trainer import PROMPT_RECIPES, FinetuneConfig

    return FinetuneConfig(
        datalist=args.datalist, out=args.out, data_root=args.data_root, base_model=args.model, train=args.train,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        patience=args.patience, objects=[int(v) for v in args.labels.split(",")] if args.labels else None,
        window=args.window, axis=args.axis, min_area=args.min_area, cache_rate=args.cache_rate,
        cache_dir=args.cache_dir, cache_embeddings=not args.no_embedding_cache,
        samples_per_epoch=args.samples_per_epoch, max_minutes=args.max_minutes,
        recipes=_recipes(args.recipes) or dict(PROMPT_RECIPES), iou_weight=args.iou_weight,
        lora_rank=args.lora_rank, seed=args.seed, resume=args.resume, device=args.device,
        fp16_weights=args.fp16_weights, progress=True, max_val_pairs=args.max_val_pairs,
    )


def interactive_config_from_args(args):
    from .interactive import InteractiveConfig

    if args.bf16 == "auto":
        import torch

        from ..model.fast import cpu_bf16_support

        bf16 = cpu_bf16_support()[0] and not torch.cuda.is_available()
    else:
        bf16 = args.bf16 == "on"
    return InteractiveConfig(
        datalist=args.datalist, out=args.out, data_root=args.data_root, base_model=args.model,
        views=tuple(v.strip() for v in args.views.split(",") if v.strip()), variants=args.variants,
        slices_per_variant=args.slices_per_variant, synthetic_slices=args.synthetic_slices,
        synthetic_share=args.synthetic_share, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, max_rounds=args.max_rounds,
        prompt_encoder_lr_scale=args.prompt_encoder_lr_scale, distill_weight=args.distill_weight,
        iou_weight=args.iou_weight, val_every=args.val_every, validation_datalist=args.validation_datalist,
        max_minutes=args.max_minutes, resume=args.resume, seed=args.seed, device=args.device, bf16=bf16,
        threads=args.threads, cache_dir=args.cache_dir, progress=True,
        chain_share=args.chain_share, chain_length=args.chain_length, teacher_model=args.teacher_model,
        end_chain_share=args.end_chain_share, keep_checkpoints=args.keep_checkpoints, stop_policy=args.stop_policy,
        empty_weight=args.empty_weight, far_prompt_share=args.far_prompt_share,
        far_prompt_reach=args.far_prompt_reach,
        **({"ct_windows": tuple(w.strip() for w in args.ct_windows.split(",") if w.strip())} if args.ct_windows else {}),
    )


def cmd_finetune(args) -> int:
    """Run `medsam-plugin finetune`; returns the exit status."""
    if args.objective == "interactive":
        from .interactive import train_interactive

        result = train_interactive(interactive_config_from_args(args))
    else:
        from .trainer import finetune

        result = finetune(config_from_args(args))
    if result["rank"] == 0:
        if args.json:
            from ..io.atomic import atomic_write_json

            atomic_write_json(args.json, result)
        print(f"wrote {result['checkpoint']} (best validation score {result['best_score']:.4f}; {result['stopped']})")
    return 0


def main(argv=None) -> int:
    """`python -m medsam_plugin.training.cli ...`: the finetune command on its own (torchrun runs this)."""
    import argparse

    parser = argparse.ArgumentParser(prog="medsam-plugin-finetune")
    add_finetune_parser(parser.add_subparsers(dest="command", required=True))
    return cmd_finetune(parser.parse_args(["finetune", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
