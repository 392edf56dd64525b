"""Export a saved training checkpoint (``<run>/checkpoints/step<N>``) the way the run's own
``--export`` would, without training: for learning curves (probe or PSNR against steps) while a
run goes on, or after it.

    python train/export_checkpoint.py --run_dir /work/runs13/mage --tag step2000 --out mage_step2000.pt
    python train/export_checkpoint.py --run_dir /work/runs13/tok --out tok_latest.pt     # tag: latest

The run's ``args.json`` (written at start by ``train/pretrain.py`` or ``train/train_tokenizer.py``)
gives the model config, so the file matches what the run exports at its end:
``{'model': sd, 'config': MAGE kwargs}`` for pre-training, ``{'state_dict': sd, 'config': ...,
'arch': ...}`` for a tokenizer; both checked by a strict load into a fresh model. Reads the module
weights DeepSpeed saved (``mp_rank_00_model_states.pt``) of fp32 runs with ZeRO 0-2. bf16/fp16
runs (ZeRO 1-2) are consolidated from the fp32 master weights in the checkpoint's optimizer states
(DeepSpeed's zero_to_fp32), with the frozen tokenizer read from the run's ``--tokenizer`` file, as
the run's own ``--export`` does. For ZeRO-3 runs use the run's ``--export``.
"""
import json
import os
import sys
from functools import partial

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mage_fast.models.checkpoint import load_state_dict_strict, read_state_dict  # noqa: E402


def run_args(run_dir: str):
    """-> (script name, its parsed arguments) from ``run_dir/args.json``."""
    path = os.path.join(run_dir, "args.json")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found: --run_dir must be a train/pretrain.py or "
                         f"train/train_tokenizer.py --output_dir")
    with open(path) as f:
        saved = json.load(f)
    argv = [a for a in saved["argv"][1:] if not a.startswith("--local_rank")]
    script = os.path.basename(saved["argv"][0])
    if script == "pretrain.py":
        import pretrain
        return script, pretrain.parse_args(argv)
    if script == "train_tokenizer.py":
        import train_tokenizer
        return script, train_tokenizer.parse_args(argv)
    raise SystemExit(f"error: {run_dir} was written by {script}; this exports pretrain.py and train_tokenizer.py runs")


def resolve_tag(ckpt_dir: str, tag: str) -> str:
    if tag == "latest":
        latest = os.path.join(ckpt_dir, "latest")
        if not os.path.isfile(latest):
            raise SystemExit(f"error: no checkpoint yet in {ckpt_dir}")
        with open(latest) as f:
            tag = f.read().strip()
    if not os.path.isdir(os.path.join(ckpt_dir, tag)):
        have = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step")) if os.path.isdir(ckpt_dir) else []
        raise SystemExit(f"error: no checkpoint {tag!r} in {ckpt_dir} (have: {', '.join(have) or 'none'})")
    return tag


def module_state_dict(ckpt_dir: str, tag: str) -> dict:
    path = os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found (a ZeRO-3 run? export it with the run's --export)")
    blob = torch.load(path, map_location="cpu", weights_only=False)  # DeepSpeed pickles its own objects
    sd = blob.get("module")
    if not isinstance(sd, dict) or not sd:
        raise SystemExit(f"error: {path} holds no module weights")
    return sd


def fp32_master(ckpt_dir: str, tag: str, sd: dict, frozen: dict) -> dict:
    """A low-precision run's weights in fp32: the optimizer's master copy, completed with the
    frozen weights (``frozen``, fp32) and the buffers of ``sd``."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from mage_fast.training.engine import complete_state_dict
    if not any(f.endswith("optim_states.pt") for f in os.listdir(os.path.join(ckpt_dir, tag))):
        raise SystemExit(f"error: {os.path.join(ckpt_dir, tag)} holds bf16/fp16 weights and no optimizer states "
                         f"(their fp32 master copy): it cannot be exported exactly")
    master = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    return complete_state_dict(master, sd, frozen)


def low_precision(sd: dict) -> bool:
    return any(v.is_floating_point() and v.dtype != torch.float32 for v in sd.values())


def export(run_dir: str, tag: str, out: str) -> dict:
    script, args = run_args(run_dir)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    tag = resolve_tag(ckpt_dir, tag)
    sd = module_state_dict(ckpt_dir, tag)
    if script == "pretrain.py":
        import pretrain
        from mage_fast.models.mage import MAGE
        cfg = pretrain.model_config(args)
        if low_precision(sd):
            with_tok = MAGE(**cfg, norm_layer=partial(nn.LayerNorm, eps=1e-6), vqgan_ckpt_path=args.tokenizer)
            sd = fp32_master(ckpt_dir, tag, sd, {"model." + n: p for n, p in with_tok.named_parameters()
                                                 if not p.requires_grad})
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
        load_state_dict_strict(MAGE(**cfg, norm_layer=partial(nn.LayerNorm, eps=1e-6), vqgan_ckpt_path=None),
                               read_state_dict({"model": sd}))
        blob = {"model": sd, "config": cfg}
    else:
        import train_tokenizer
        args.init_from = None  # the weights come from the checkpoint
        _, cfg, arch = train_tokenizer.build_tokenizer_model(args)
        if low_precision(sd):
            sd = fp32_master(ckpt_dir, tag, sd, {})
        sd = {k[len("vq."):]: v for k, v in sd.items() if k.startswith("vq.")}
        load_state_dict_strict(train_tokenizer.fresh_tokenizer(cfg, arch, args.img_size), sd)
        blob = {"state_dict": sd, "config": cfg, "arch": arch}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    torch.save(blob, tmp)
    os.replace(tmp, out)
    return {"run_dir": run_dir, "tag": tag, "step": int(tag[len("step"):]) if tag[4:].isdigit() else None,
            "out": out, "tensors": len(sd)}


def main(argv=None):
    from mage_fast.script_exit import ArgumentParser
    ap = ArgumentParser(description=__doc__)  # one-line usage errors; --help shows every default
    ap.add_argument("--run_dir", required=True, help="the run's --output_dir")
    ap.add_argument("--tag", default="latest", help="a checkpoint name (step<N>) or 'latest'")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    print(json.dumps(export(args.run_dir, args.tag, args.out)))


if __name__ == "__main__":
    from mage_fast.script_exit import run_script
    run_script(main)
