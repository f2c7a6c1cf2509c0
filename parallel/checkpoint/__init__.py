"""Checkpoints we own (DeepSpeed's own would save rank 0's module and drop every other rank's experts).

    path  = save_checkpoint(ckpt_root, step, engine, ema, train_state, cfg)   # collective
    saver = Checkpointer(ckpt_root, cfg)                                       # the trainer's, sync or async
    state = load_checkpoint(path, engine, ema, cfg)                            # collective, reshards
    path  = resolve_resume(cfg)                                                # train.resume

One folder per step, `ckpt_root/step_XXXXXXX/`:

    rank_RRRRR.safetensors   what rank R holds and nobody else writes (parallel.checkpoint.layout):
                             its ZeRO partition's range of every trained parameter's fp32 master weight
                             (model/<name>), AdamW moments (exp_avg/<name>, exp_avg_sq/<name>) and EMA
                             (ema/<name>), flattened; untrained tensors (buffers, frozen parameters) whole,
                             spread over the ranks; its RNG states (rng)
    manifest.json            step, config, world and expert-parallel sizes, tensor table (global shapes,
                             expert or not), files (size, sha256, which element range of which tensor each
                             holds), optimizer scalars, lr schedule, train_state (data position)

`latest` (next to the step folders) names the newest complete checkpoint. Writing: see
`parallel.checkpoint.save`; durability and atomicity: `parallel.checkpoint.files`; agreement on
failure: `parallel.checkpoint.agree`; loading and resharding: `parallel.checkpoint.load`.
"""
from parallel.checkpoint.files import CheckpointError
from parallel.checkpoint.layout import read_manifest, step_dir_name
from parallel.checkpoint.load import checkpoint_dir, latest_checkpoint, load_checkpoint, resolve_resume
from parallel.checkpoint.reader import CheckpointReader, verify_checkpoint
from parallel.checkpoint.save import Checkpointer, save_checkpoint

__all__ = ["CheckpointError", "CheckpointReader", "Checkpointer", "save_checkpoint", "load_checkpoint",
           "resolve_resume", "checkpoint_dir", "latest_checkpoint", "read_manifest", "verify_checkpoint",
           "step_dir_name"]
