"""One dataclass tree for every experiment, loaded from YAML and overridden by `key.path=value`.

    cfg = load_config("configs/quickstart.yaml", ["train.max_steps=20", "model.moe.pool=ep_group"])

Unknown keys and bad values raise `ConfigError` with a one-line message naming the key; entry
points turn it into `config error: ...` on stderr and exit code 2 (see `config_or_exit`).
"""
from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem; the message names the offending key."""


# --------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------


@dataclass
class MoEConfig:
    """The FFN slot of the DiT blocks (see REFERENCE.md for the papers' values)."""

    routing: Literal["dense", "token_choice", "expert_choice", "diffmoe"] = "dense"
    # Token pool of expert-choice routing: one sample (EC-DiT), one rank's micro-batch (reference
    # DiffMoE), or the cross-rank pool over the expert-parallel group / the whole world.
    pool: Literal["sample", "micro_batch", "ep_group", "world"] = "micro_batch"
    num_experts: int = 16
    every: int = 2  # MoE replaces the FFN in blocks i with i % every == every - 1 (2: odd blocks)
    expert_hidden: int = 0  # 0 means mlp_ratio * hidden_size
    activation: Literal["gelu_tanh", "swiglu"] = "gelu_tanh"
    # Router
    router: Literal["softmax", "sigmoid_bias"] = "softmax"  # sigmoid_bias: DeepSeek-V3 aux-free
    # auto: each reference's rule: N(0, router_init_std) for expert_choice / diffmoe (DiffMoE, EC-DiT),
    # kaiming_uniform (U(+-1/sqrt(d))) for softmax token choice (TC-DiT, Diff-MoE), kaiming_normal
    # (N(0, 2/d)) for the sigmoid_bias router (the recipe)
    router_init: Literal["auto", "normal", "kaiming_uniform", "kaiming_normal"] = "auto"
    router_init_std: float = 0.006  # router_init=normal (auto for expert choice)
    top_k: int = 2  # token choice: experts per token
    normalize_weights: bool = False  # token choice: renormalise the top-k weights to sum to 1 (sigmoid_bias: always)
    routed_scaling: float = 1.0  # multiplies routed weights (recipe: 2.0 for E16, 2.5 for E48)
    bias_update_rate: float = 0.001  # sigmoid_bias: per-step nudge of the balancing bias
    capacity: float = 1.0  # expert choice: k = int(pool_tokens / E * capacity); TC: capacity factor (keep int(c * pool * top_k / E))
    # token choice: drop tokens over capacity (GShard/Switch style). Off by default: TC-DiT, Diff-MoE and
    # the recipe never drop (docs/fidelity.md)
    drop_tokens: bool = False
    aux_loss_weight: float = 0.01  # token choice load-balance loss alpha
    # Shared experts (DeepSeek / Diff-MoE): always-on FFNs added to the routed output
    num_shared_experts: int = 0
    shared_expert_hidden: int = 0  # width of one shared expert, 0 means expert_hidden; they run fused (n * width)
    # Diff-MoE: time-aware experts, global channel recalibration, depthwise-conv spatial path
    time_aware: bool = False
    time_rank: int = 64  # rank of the per-expert adaLN and of the recalibration bottleneck
    # per-expert adaLN init: xavier (the Diff-MoE reference, where DiT's xavier init reaches it) or zero
    # (up-projection zero: every time-aware expert starts as the identity)
    expert_adaln_init: Literal["xavier", "zero"] = "xavier"
    recalibration: bool = False
    spatial_conv_kernel: int = 0  # 0 off, else kernel size of the depthwise conv (5 in Diff-MoE)
    # DiffMoE capacity predictor and schedule
    predictor: bool = True
    predictor_loss_weight: float = 1.0
    threshold_ema: float = 0.95
    capacity_schedule_stage1: int = 0  # capacity = E until this step (0: no schedule)
    capacity_schedule_stage2: int = 0  # then linear decay to `capacity` by this step
    # Inference of DiffMoE
    inference: Literal["static", "dynamic"] = "static"  # static: training top-k over the sampling batch; dynamic: predictor
    threshold_shift: float = 0.0  # added to dynamic thresholds: > 0 less compute, < 0 more
    # classifier-free guidance: route the conditional and unconditional halves in separate pools
    # (two forwards, as the DiffMoE flow sampler) or in one joint pool (one batched forward, as DiT's
    # forward_with_cfg that the DiffMoE DDPM sampler uses); token-local routings give the same either way
    cfg_pool: Literal["separate", "joint"] = "separate"


@dataclass
class TextConfig:
    """Text conditioning (text-to-image, docs/t2i.md). `encoder: none` means class-conditional.

    tiny_clip / tiny_t5: randomly initialised 2-layer encoders with a byte-level tokenizer, built
    from code (tests, quickstart); clip / t5: a local transformers folder at `path`.
    """

    encoder: Literal["none", "clip", "t5", "tiny_clip", "tiny_t5"] = "none"
    path: str = ""  # local folder of a transformers text model (no download at run time)
    tokenizer: str = ""  # tokenizer folder when not inside `path` (diffusers layout: .../tokenizer)
    max_length: int = 77  # tokens per caption (padded / truncated); CLIP has at most 77 positions
    dim: int = 0  # encoder width; read from `path`'s config.json when 0 (tiny encoders: 64)
    caption_dropout: float = 0.1  # probability a caption is replaced by the empty prompt (CFG)
    # read token states from the shards (`make_shards captions --text-encoder`); the encoder at `path`
    # is still loaded once, to embed the empty prompt, and then released
    precomputed: bool = False


@dataclass
class ModelConfig:
    depth: int = 12
    hidden_size: int = 384
    num_heads: int = 6
    patch_size: int = 2
    input_size: int = 32  # latent (or pixel) side length
    in_channels: int = 4
    num_classes: int = 1000
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    # the timestep embedder's sinusoids see time_offset + time_scale * t (t in [0, 1], 0 = noise), the
    # references' own time variable: DiT's DDPM step index 999 - 1000 t, DiffMoE's flow raw t (0, 1),
    # Diff-MoE's flow 1 - t (docs/fidelity.md)
    time_scale: float = 1000.0
    time_offset: float = 0.0
    ffn_activation: Literal["gelu_tanh", "silu"] = "gelu_tanh"  # dense FFN blocks (the recipe's code: silu)
    learn_sigma: bool = False  # DDPM learned-range sigma doubles the output channels
    position: Literal["sincos", "rope"] = "sincos"  # rope: 2D RoPE, absolute embedding dropped
    attention: Literal["sdpa", "math"] = "sdpa"
    grad_checkpointing: bool = False
    compile: bool = False
    moe: MoEConfig = field(default_factory=MoEConfig)
    text: TextConfig = field(default_factory=TextConfig)


@dataclass
class DiffusionConfig:
    objective: Literal["flow", "ddpm"] = "flow"
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    num_timesteps: int = 1000  # DDPM training steps (linear betas)
    sampler: Literal["euler", "heun", "ddpm", "ddim"] = "euler"
    sample_steps: int = 250
    cfg_scale: float = 1.0
    # channels guidance applies to: auto = DiT's first 3 for DDPM (the rest conditional), all for flow
    cfg_channels: Literal["auto", "first3", "all"] = "auto"


@dataclass
class DataConfig:
    """Training data (docs/data.md): shards written by `python -m engine.data.make_shards`."""

    source: Literal["digits", "imagenet", "captions"] = "digits"
    shards: str = ""  # folder with shards + index.json (digits: built on first use if empty)
    latent: bool = False  # samples are VAE latents (imagenet) rather than pixels
    vae: str = ""  # local AutoencoderKL folder for on-the-fly encoding / decoding samples
    # global: indexed random access, the same global batches whatever the world size (default);
    # stream: webdataset streaming for unindexed data, deterministic per world size only
    order: Literal["global", "stream"] = "global"
    num_workers: int = 2  # DataLoader worker processes per rank (0: load in the training process)
    shuffle_buffer: int = 1000  # data.order=stream: samples in each stream's shuffle buffer
    # horizontal flip (ImageNet latents: the stored latent of the flipped image); off for digits
    random_flip: bool = False


@dataclass
class ParallelConfig:
    ep_size: int = 1  # expert-parallel degree; divides the world size
    zero_stage: int = 2  # DeepSpeed ZeRO stage: 1 or 2 (see validate for why not 0 or 3)
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # Cross-rank pool selection: exact either way; `radix` sends metadata independent of tokens.
    pool_selection: Literal["gather", "radix"] = "radix"


@dataclass
class EvalConfig:
    """In-training evaluation (digits: eval/class_acc of class-conditional EMA samples) and grids."""

    num_samples: int = 500  # class-conditional samples classified at each evaluation (0: no eval)
    sample_steps: int = 50  # sampler steps of evaluation samples and training-time sample grids
    cfg_scale: float = 1.0  # classifier-free guidance of evaluation samples and grids
    every: int = 0  # also evaluate every N steps; 0: only at the end of training
    batch_size: int = 0  # samples per forward pass per rank; 0 means train micro batch size


@dataclass
class TrainConfig:
    output_dir: str = ""  # default runs/<config file stem>
    max_steps: int = 1000
    global_batch_size: int = 256
    micro_batch_size: int = 0  # per rank; 0 means global_batch_size / data-parallel world
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0  # linear lr warm-up over this many optimizer steps, then constant
    grad_clip: float = 0.0  # 0: no clipping (the papers)
    ema_decay: float = 0.9999  # fp32 EMA of the weights; samples and evaluation use it
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    log_every: int = 50  # steps between metrics.jsonl / TensorBoard / console records
    sample_every: int = 0  # steps between EMA sample grids (samples/*.png); 0: only at the end
    save_every: int = 1000  # steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 3
    async_checkpoint: bool = False  # host copy, then the checkpoint is written in the background while training goes on
    max_nonfinite_steps: int = 5  # this many skipped non-finite steps in a row stop the run
    seed: int = 0  # model init and every per-sample draw (noise, timestep, label dropout)
    resume: str = ""  # "" fresh, "auto" latest in output_dir/checkpoints, or a checkpoint folder
    progress: bool = True  # progress bar on an interactive console (log lines are always printed)


@dataclass
class Config:
    name: str = "experiment"
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.train.output_dir or f"runs/{self.name}")


# --------------------------------------------------------------------------------------------
# Loading, overriding, validating
# --------------------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one YAML value against a field type; raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is tuple:  # fixed-length tuples only, e.g. betas
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")  # a programming error in this file


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown key '{full}' (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else list(v) if isinstance(v, tuple) else v
    return out


def _set_path(tree: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            raise ConfigError(f"unknown key '{'.'.join(parts[: i + 1])}' in override '{path}'")
        node = child
    if parts[-1] not in node:
        raise ConfigError(f"unknown key '{path}'")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        pairs.append((key.strip(), value))
    return pairs


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- overrides, validated; raises ConfigError naming the key."""
    tree = to_dict(Config())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        _build(Config, data, "")  # names unknown keys with their full path
        _merge(tree, data)
        tree["name"] = data.get("name", path.stem)
    for key, value in parse_overrides(overrides or []):
        _set_path(tree, key, value)
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def _merge(base: dict, update: dict) -> None:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


def _validate_moe(moe: MoEConfig) -> None:
    """Cross-field checks of model.moe (docs/moe.md)."""
    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"model.moe.{key}: {msg}")

    need(moe.router == "softmax" or moe.routing == "token_choice", "router",
         "sigmoid_bias (DeepSeek-V3 balancing bias) is a token-choice router; expert choice is balanced by construction")
    need(moe.inference == "static" or moe.routing not in ("expert_choice", "diffmoe") or moe.predictor, "inference",
         "dynamic inference needs the capacity predictor (model.moe.predictor=true)")
    for key, value in [("expert_hidden", moe.expert_hidden), ("shared_expert_hidden", moe.shared_expert_hidden),
                       ("num_shared_experts", moe.num_shared_experts), ("spatial_conv_kernel", moe.spatial_conv_kernel),
                       ("aux_loss_weight", moe.aux_loss_weight), ("predictor_loss_weight", moe.predictor_loss_weight),
                       ("bias_update_rate", moe.bias_update_rate), ("capacity_schedule_stage1", moe.capacity_schedule_stage1)]:
        need(value >= 0, key, f"must be >= 0, got {value}")
    need(moe.time_rank > 0, "time_rank", f"must be positive, got {moe.time_rank}")
    need(moe.spatial_conv_kernel % 2 == 1 or moe.spatial_conv_kernel == 0, "spatial_conv_kernel",
         f"must be odd (same-size depthwise conv) or 0 (off), got {moe.spatial_conv_kernel}")
    need(0 <= moe.threshold_ema < 1, "threshold_ema", f"must be in [0, 1), got {moe.threshold_ema}")
    need(moe.routed_scaling > 0, "routed_scaling", f"must be positive, got {moe.routed_scaling}")
    need(moe.capacity_schedule_stage2 == 0 or moe.capacity_schedule_stage2 > moe.capacity_schedule_stage1,
         "capacity_schedule_stage2", f"must be 0 (no schedule) or > capacity_schedule_stage1 ({moe.capacity_schedule_stage1})")


def validate(cfg: Config) -> None:
    """Cross-field checks that a type alone cannot express."""
    m, moe, t = cfg.model, cfg.model.moe, cfg.train

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    for key, value in [("model.depth", m.depth), ("model.hidden_size", m.hidden_size),
                       ("model.num_heads", m.num_heads), ("model.patch_size", m.patch_size),
                       ("model.input_size", m.input_size), ("model.in_channels", m.in_channels),
                       ("model.moe.num_experts", moe.num_experts), ("model.moe.every", moe.every),
                       ("train.max_steps", t.max_steps), ("train.global_batch_size", t.global_batch_size),
                       ("train.log_every", t.log_every), ("parallel.ep_size", cfg.parallel.ep_size)]:
        need(value > 0, key, f"must be positive, got {value}")
    need(m.hidden_size % m.num_heads == 0, "model.num_heads",
         f"hidden_size {m.hidden_size} is not divisible by num_heads {m.num_heads}")
    need(m.input_size % m.patch_size == 0, "model.patch_size",
         f"input_size {m.input_size} is not divisible by patch_size {m.patch_size}")
    if m.position == "rope":
        need((m.hidden_size // m.num_heads) % 4 == 0, "model.position",
             "2D RoPE needs a head dimension divisible by 4")
    need(0 < moe.top_k <= moe.num_experts, "model.moe.top_k",
         f"must be in 1..num_experts ({moe.num_experts}), got {moe.top_k}")
    need(moe.capacity > 0, "model.moe.capacity", f"must be positive, got {moe.capacity}")
    need(cfg.parallel.zero_stage in (1, 2), "parallel.zero_stage",
         f"must be 1 or 2, got {cfg.parallel.zero_stage}: stage 0 has no partitioned optimizer to give the gradient "
         "norm and the non-finite step guard, and stage 3 partitions the parameters, while the EMA, the sampler and "
         "the expert-parallel MoE layers (whose experts differ per rank) need every parameter whole on its rank")
    need(moe.num_experts % cfg.parallel.ep_size == 0, "parallel.ep_size",
         f"{cfg.parallel.ep_size} does not divide model.moe.num_experts={moe.num_experts}")
    need(0 <= m.class_dropout_prob < 1, "model.class_dropout_prob", "must be in [0, 1)")
    need(m.time_scale != 0, "model.time_scale", "must not be 0 (the timestep embedding would not see t)")
    if m.text.encoder != "none":
        text, tiny = m.text, m.text.encoder.startswith("tiny_")
        need(0 <= text.caption_dropout < 1, "model.text.caption_dropout", "must be in [0, 1)")
        need(text.max_length >= 2, "model.text.max_length", f"must be >= 2 (start and end tokens), got {text.max_length}")
        need(text.dim >= 0, "model.text.dim", f"must be >= 0 (0: the encoder's width), got {text.dim}")
        need(tiny or text.path != "", "model.text.path",
             f"model.text.encoder={text.encoder} loads a local transformers folder: set its path")
        need(cfg.data.source in ("digits", "captions"), "data.source",
             f"a text-conditioned model trains on captions: 'captions' shards or 'digits', not {cfg.data.source!r}")
        if text.precomputed:
            need(cfg.data.source == "captions", "model.text.precomputed",
                 "only caption shards hold precomputed text embeddings (make_shards captions --text-encoder)")
            need(not tiny, "model.text.precomputed", "stored embeddings come from an encoder folder: set "
                 "model.text.encoder to clip or t5 and model.text.path to the folder the shards were encoded with")
    need(0 <= t.ema_decay < 1, "train.ema_decay", "must be in [0, 1)")
    need(t.lr > 0, "train.lr", f"must be positive, got {t.lr}")
    need(t.micro_batch_size >= 0, "train.micro_batch_size", "must be >= 0")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    for key, value in [("train.sample_every", t.sample_every), ("train.save_every", t.save_every),
                       ("train.warmup_steps", t.warmup_steps), ("eval.every", cfg.eval.every),
                       ("eval.num_samples", cfg.eval.num_samples), ("eval.batch_size", cfg.eval.batch_size)]:
        need(value >= 0, key, f"must be >= 0, got {value}")
    need(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0: no clipping), got {t.grad_clip}")
    need(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", f"must be >= 1, got {t.max_nonfinite_steps}")
    need(cfg.eval.sample_steps >= 1, "eval.sample_steps", f"must be >= 1, got {cfg.eval.sample_steps}")
    need(cfg.eval.cfg_scale >= 1, "eval.cfg_scale", f"must be >= 1 (1: no guidance), got {cfg.eval.cfg_scale}")
    need(cfg.data.num_workers >= 0, "data.num_workers", f"must be >= 0, got {cfg.data.num_workers}")
    need(cfg.data.shuffle_buffer >= 1, "data.shuffle_buffer", f"must be >= 1, got {cfg.data.shuffle_buffer}")
    if cfg.data.source != "digits":
        need(cfg.data.shards != "", "data.shards",
             f"data.source={cfg.data.source} needs the folder written by `python -m engine.data.make_shards`")
    if moe.routing in ("expert_choice",):
        need(moe.pool == "sample", "model.moe.pool", "expert_choice (EC-DiT) routes within one sample: use pool=sample")
    _validate_moe(moe)
    if cfg.diffusion.objective == "flow":
        need(cfg.diffusion.sampler in ("euler", "heun"), "diffusion.sampler",
             "rectified flow samples with 'euler' or 'heun'")
        need(not m.learn_sigma, "model.learn_sigma",
             "rectified flow predicts a velocity only (learned sigma is for DDPM); set it to false")
    else:
        need(cfg.diffusion.sampler in ("ddpm", "ddim"), "diffusion.sampler",
             "DDPM samples with 'ddpm' (ancestral) or 'ddim'")
        need(cfg.diffusion.timestep_sampling == "uniform", "diffusion.timestep_sampling",
             "DDPM trains on uniformly drawn steps; use 'uniform'")
        need(cfg.diffusion.num_timesteps >= 2, "diffusion.num_timesteps",
             f"must be at least 2, got {cfg.diffusion.num_timesteps}")
        for key, steps in [("diffusion.sample_steps", cfg.diffusion.sample_steps), ("eval.sample_steps", cfg.eval.sample_steps)]:
            need(2 <= steps <= cfg.diffusion.num_timesteps, key,
                 f"DDPM respacing needs 2..diffusion.num_timesteps ({cfg.diffusion.num_timesteps}), got {steps}")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_or_exit(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """For entry points: a config problem is one line on stderr and exit code 2, no traceback."""
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
